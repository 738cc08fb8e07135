"""The command line, end to end in subprocesses: what a user types, what they see."""

import inspect
import subprocess
import sys

import matplotlib.image
import pytest
from conftest import TINY_TRAIN


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "audioshard", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_teaches():
    out = run("--help").stdout
    for command in ("demo-data", "build", "info", "clean", "train", "evaluate", "show", "check", "config"):
        assert command in out
    assert "--set" in run("train", "--help").stdout and "torchrun" in run("train", "--help").stdout


def test_every_help_shows_defaults_that_say_something_and_each_once():
    """`(default: None)` after an option that is simply off, or a default given twice, is noise in --help."""
    import argparse

    from audioshard.cli import build_parser

    def helps(parser):
        yield parser.format_help()
        for action in parser._actions:  # argparse keeps subcommands here only
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from helps(sub)

    texts = list(helps(build_parser()))
    assert len(texts) > 15  # the top level and every command
    for text in texts:
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, text
    youtube = " ".join(run("fetch", "youtube", "--help").stdout.split())
    assert "(default: raw)" in youtube and "(default: 3)" in youtube  # a real default still shows
    report = " ".join(run("report", "--help").stdout.split())
    assert report.count("default") == report.count("defaults otherwise") + 1  # --shards: said once


def test_demo_data_build_info_show_check_train_evaluate_clean(tmp_path):
    raw, shards, runs = tmp_path / "raw", tmp_path / "shards", tmp_path / "run"
    assert "synthetic" in run("demo-data", raw, "--seconds", "30").stdout
    out = run("build", raw, "--out", shards, "--quiet", "--set", "shards.chunks_per_shard=64").stdout
    assert "train chunks" in out and "drone" in out and "voice" in out
    assert "nothing to do" in run("build", raw, "--out", shards, "--quiet", "--set",
                                  "shards.chunks_per_shard=64").stdout
    assert "normalisation" in run("info", shards).stdout
    assert "label" in run("show", shards, "--index", "3", "--out", tmp_path / "c.png").stdout
    assert matplotlib.image.imread(tmp_path / "c.png").ndim == 3
    check = run("check", shards, "--set", "train.batch_size=8").stdout
    assert "torch.float32" in check and "label mix" in check
    run("train", "--shards", shards, "--out", runs, "--quiet", *[a for s in TINY_TRAIN for a in ("--set", s)])
    assert (runs / "best_model.pt").exists()
    evaluated = run("evaluate", "--checkpoint", runs / "best_model.pt", "--shards", shards, "--out", tmp_path / "e")
    assert "clip-level" in evaluated.stdout and (tmp_path / "e" / "test_report.txt").exists()
    assert "removed" in run("clean", shards).stdout and not shards.exists()


@pytest.mark.parametrize("args, message", [
    (["config", "--set", "train.bogus=1"], "valid keys in [train]"),
    (["info", "/nonexistent/build"], "no such folder"),
    (["clean", "."], "does not look like an audioshard build"),
    (["build", "/nonexistent/raw", "--out", "/tmp/x"], "not a folder or a .csv file"),
])
def test_errors_are_one_clear_line(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_every_stage_error_is_an_audioshard_error_and_keeps_its_builtin_base():
    """`audioshard` catches one type; library users catching the built-in type (e.g. OSError for a
    source that cannot be read, ValueError for a bad setting) still do."""
    from audioshard.acquire.common import AcquireError
    from audioshard.audio import AudioError
    from audioshard.build import BuildError
    from audioshard.checkpoint import CheckpointError
    from audioshard.config import ConfigError
    from audioshard.errors import AudioshardError
    from audioshard.export import ExportError
    from audioshard.manifest import ManifestError
    from audioshard.models import AdaptError
    from audioshard.predict import PredictError
    from audioshard.remote import IntegrityError, SourceError
    from audioshard.shardfile import ShardDataError
    from audioshard.train import TrainingError

    for error in (AcquireError, AudioError, BuildError, CheckpointError, ConfigError, ExportError, ManifestError,
                  AdaptError, PredictError, SourceError, IntegrityError, ShardDataError, TrainingError):
        assert issubclass(error, AudioshardError), error
    assert issubclass(IntegrityError, OSError) and issubclass(ConfigError, ValueError)
    assert issubclass(TrainingError, RuntimeError)


def test_the_names_users_choose_from_are_the_registries_the_stages_use():
    from audioshard.models import MODELS
    from audioshard.names import BAND_NORM_MODELS, MODEL_NAMES

    assert tuple(MODELS) == MODEL_NAMES  # every model the settings accept is one the zoo builds
    takes_n_mels = tuple(n for n, m in MODELS.items() if "n_mels" in inspect.signature(m).parameters)
    assert takes_n_mels == BAND_NORM_MODELS  # input_norm "bn" is accepted for exactly the models with its layer
    for command, option, values in [("evaluate", "--split", "train, val, test"),
                                    ("predict", "--format", "table, csv, json"),
                                    ("export", "--format", "onnx, torchscript")]:
        proc = run(command, option, "bogus", check=False)
        assert proc.returncode == 2 and values.replace(", ", "', '") in proc.stderr, proc.stderr


def test_progress_off_a_terminal_is_a_few_whole_lines(tmp_path):
    """Logs and CI get lines, not carriage-return redraws: the build a line per tenth of its files, training
    one line per epoch (its summary), and no bar at all."""
    run("demo-data", tmp_path / "raw", "--seconds", "30")
    built = run("build", tmp_path / "raw", "--out", tmp_path / "shards", "--workers", "1")  # not --quiet
    lines = [line for line in built.stderr.splitlines() if line.startswith("build: ")]
    assert "\r" not in built.stderr and 2 <= len(lines) <= 11, built.stderr
    assert lines[-1].startswith(f"build: {lines[-1].split()[1].split('/')[1]}/")  # the last line: all files
    trained = run("train", "--shards", tmp_path / "shards", "--out", tmp_path / "run",
                  *[a for s in TINY_TRAIN for a in ("--set", s)])
    assert "\r" not in trained.stderr + trained.stdout
    assert sum(line.startswith("epoch ") for line in trained.stdout.splitlines()) == 3  # TINY_TRAIN: 3 epochs


def test_help_and_info_do_not_load_torch(real_build):
    """What keeps them quick (0.07 s and 0.18 s here against 1.6 s with torch): they import only what
    reading a manifest needs. Timings are the benchmarks' job; this checks the cause."""
    code = ("import sys\nfrom audioshard.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'torchaudio' not in sys.modules, 'torch was imported'")
    for args in (["info", str(real_build)], ["config"], ["--help"], ["train", "--help"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stderr)
