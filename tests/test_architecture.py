"""The module map holds: no import circle between audioshard's modules (module-level imports; a lazy import
inside a function is how an optional dependency is reached), and storage back ends are reached through
remote.py's scheme table, never the other way round."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "audioshard"


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("audioshard"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("audioshard")}
        graph[name] = deps
    return graph


def test_no_import_circle():
    graph = module_imports()
    circles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    circles.append(" -> ".join([*path, dep]))
                elif dep not in path:
                    stack.append((dep, [*path, dep]))
    assert circles == []


def test_a_storage_back_end_never_imports_the_reader_that_dispatches_to_it():
    from audioshard import remote

    s3 = ast.parse((PACKAGE / "s3.py").read_text())
    names = {n.module for n in ast.walk(s3) if isinstance(n, ast.ImportFrom)}
    assert "audioshard.remote" not in names
    assert set(remote.BODY_OPENERS) == set(remote.REMOTE_SCHEMES)


def test_torch_distributed_is_asked_in_distributed_py_only():
    users = sorted(p.name for p in PACKAGE.rglob("*.py") if p.name != "distributed.py"
                   and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "torch.distributed" in ast.unparse(n)
                           or isinstance(n, ast.Attribute) and ast.unparse(n).startswith("torch.distributed.")
                           for n in ast.walk(ast.parse(p.read_text()))))
    assert users == []


def test_the_reader_numbers_are_worked_out_in_distributed_py_only():
    """Which DataLoader worker a process is, and so which reader of a split, is asked in one place
    (`distributed.World`); the dataset is handed the record."""
    askers = sorted(p.name for p in PACKAGE.rglob("*.py") if p.name != "distributed.py"
                    and "get_worker_info" in p.read_text())
    assert askers == []


def test_no_module_is_longer_than_a_reader_can_hold():
    """One job per module: none over 600 lines (the longest were split by job, not by line count)."""
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 600} == {}
    assert len(lengths) > 40  # every module was looked at


def test_no_module_reaches_into_another_modules_private_names():
    """A name with a leading underscore is its module's own: another module that needs it gets it public, so
    the interface between modules is what their public names say (lazy imports included)."""
    reaching = sorted(f"{p.name}: {node.module}.{alias.name}" for p in PACKAGE.rglob("*.py")
                      for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("audioshard")
                      for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__"))
    assert reaching == []
