"""The `audioshard` command: one subcommand per stage, each a thin shell over a library function.

    audioshard demo-data demo/raw                       # synthetic 3-class audio, offline
    audioshard build demo/raw --out demo/shards         # raw audio -> shards + manifest.json
    audioshard info demo/shards                         # class balance per split
    audioshard train --shards demo/shards --out demo/run
    audioshard evaluate --checkpoint demo/run/best_model.pt --shards demo/shards --split test --out demo/eval

Every command takes --config FILE and repeated --set section.key=value (see config.toml).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from audioshard import __version__
from audioshard.config import Config, ConfigError, dump_toml, load_config


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or ())


def cmd_demo_data(args: argparse.Namespace) -> int:
    from audioshard.demo import make_demo_data

    counts = make_demo_data(args.dir, seconds_per_class=args.seconds, seed=args.seed)
    print(f"wrote {sum(counts.values())} synthetic recordings to {args.dir}/ "
          f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from audioshard.build import BuildError, build_shards, merge_parts
    from audioshard.info import format_info

    if args.merge:
        manifest = merge_parts(args.out)
        print(format_info(manifest, str(args.out)))
        return 0
    if args.input is None:
        raise BuildError("give an INPUT folder or CSV (or --merge to combine part builds in --out)")
    part = None
    if args.part:
        try:
            index, count = (int(v) for v in args.part.split("/"))
        except ValueError as exn:
            raise BuildError(f"--part expects I/N, e.g. --part 0/4; got {args.part!r}") from exn
        part = (index, count)
    cfg = _config(args)
    result = build_shards(args.input, args.out, cfg, workers=args.workers, force=args.force,
                          progress=not args.quiet, part=part)
    if result.up_to_date:
        print(f"{args.out}: already built from these inputs and settings; nothing to do (--force rebuilds)")
        return 0
    print(format_info(result.manifest, str(args.out)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from audioshard.info import format_info
    from audioshard.manifest import load_manifest

    manifest = load_manifest(args.source)
    print(format_info(manifest.data, args.source, verbose=args.verbose))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from audioshard.build import clean

    removed = clean(args.dir)
    print(f"removed {len(removed)} build files from {args.dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from audioshard.train import train

    cfg = _config(args)
    train(args.shards, args.out, cfg, resume=args.resume, progress=not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from audioshard.evaluate import evaluate_checkpoint, iter_metrics_lines

    cfg = _config(args)
    metrics = evaluate_checkpoint(args.checkpoint, args.shards, args.split, args.out, device_name=cfg.train.device,
                                  batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers,
                                  fetcher=cfg.fetcher())
    print(f"{args.split} split of {args.shards}:")
    for line in iter_metrics_lines(metrics):
        print("  " + line)
    print(f"reports in {args.out}/: {args.split}_report.txt, {args.split}_confusion_matrix.png, metrics.json, "
          "pred_labels.npy, true_labels.npy")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from audioshard.info import show_chunk

    text = show_chunk(args.source, args.split, args.index, args.out)
    print(text)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from audioshard.info import check_pipeline

    cfg = _config(args)
    print(check_pipeline(args.source, args.split, cfg, batches=args.batches))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from audioshard.manifest import MANIFEST_NAME
    from audioshard.serve import make_server

    if not (Path(args.dir) / MANIFEST_NAME).exists():
        print(f"audioshard serve: error: {args.dir} has no {MANIFEST_NAME}; serve a folder written by "
              "`audioshard build`", file=sys.stderr)
        return 2
    server = make_server(args.dir, args.host, args.port, quiet=False)
    print(f"serving {args.dir} at http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_toml(_config(args)), end="")
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (see config.toml); defaults otherwise")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"audioshard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, description: str = ""):
        p = sub.add_parser(name, help=help_text, description=description or help_text, formatter_class=fmt)
        p.set_defaults(handler=handler)
        _add_config_args(p)
        return p

    p = add("demo-data", cmd_demo_data, "write a small synthetic 3-class data set (drone, engine, voice)",
            "Synthesise a few minutes of 3-class audio with a fixed seed: drone-like harmonic buzz, engine-like "
            "rumble and formant-like voice. Synthetic: a pipeline check, not a benchmark.")
    p.add_argument("dir", type=Path, help="output folder (one subfolder per class)")
    p.add_argument("--seconds", type=float, default=90.0, help="seconds of audio per class")
    p.add_argument("--seed", type=int, default=0, help="random seed")

    p = add("build", cmd_build, "turn raw audio into train/val/test WebDataset shards + manifest.json",
            "Decode, resample, chunk and featurise every recording, split by recording (no leakage), and write "
            "shards. INPUT is a folder with one subfolder per class, or a CSV with columns path,label and "
            "optional group,split. Corrupt files are reported and skipped (see `audioshard info`).")
    p.add_argument("input", type=Path, nargs="?", help="class-per-folder directory or CSV file")
    p.add_argument("--out", type=Path, default=Path("shards"), help="output folder")
    p.add_argument("--workers", type=int, default=None, 
                   help="decoding processes (default: shards.workers, 0 = all cores)")
    p.add_argument("--force", action="store_true", help="replace what is in --out")
    p.add_argument("--part", metavar="I/N", help="build only part I of N into OUT/part-I-of-N/ (job arrays: run "
                   "I = 0..N-1 anywhere, then --merge)")
    p.add_argument("--merge", action="store_true", help="write OUT/manifest.json over the finished part builds in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("info", cmd_info, "print a build's manifest as tables (class balance per split)")
    p.add_argument("source", help="build folder or http(s) URL of one")
    p.add_argument("--verbose", "-v", action="store_true", help="list every skipped file and shard")

    p = add("clean", cmd_clean, "remove what a build wrote (refuses folders that are not builds)")
    p.add_argument("dir", type=Path, help="build folder")

    p = add("train", cmd_train, "train a classifier by streaming shards",
            "Train on a build's shards (folder or http(s) URL). Writes best_model.pt, last.pt, history.jsonl, "
            "metrics.json, val/test reports and confusion matrices, pred_labels.npy/true_labels.npy into --out. "
            "Multi-GPU: torchrun --nproc_per_node=N -m audioshard train ...")
    p.add_argument("--shards", required=True, help="build folder or http(s) URL of one")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", cmd_evaluate, "evaluate a checkpoint on one split (chunk- and recording-level)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a best_model.pt or last.pt")
    p.add_argument("--shards", required=True, help="build folder or http(s) URL of one")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    p.add_argument("--out", type=Path, required=True, help="folder for reports")

    p = add("show", cmd_show, "plot one chunk's mel spectrogram with its label, source and time")
    p.add_argument("source", help="build folder or http(s) URL of one")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split")
    p.add_argument("--index", type=int, default=0, help="chunk number within the split (shard order)")
    p.add_argument("--out", type=Path, default=Path("chunk.png"), help="PNG to write")

    p = add("check", cmd_check, "pull a few batches through the real pipeline and describe them")
    p.add_argument("source", help="build folder or http(s) URL of one")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split")
    p.add_argument("--batches", type=int, default=3, help="batches to pull")

    p = add("serve", cmd_serve, "serve a build folder over HTTP (train from it with --shards http://HOST:PORT/)")
    p.add_argument("dir", type=Path, help="build folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")

    add("config", cmd_config, "print the resolved settings as TOML (defaults + --config + --set)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from audioshard.audio import AudioError
    from audioshard.build import BuildError
    from audioshard.checkpoint import CheckpointError
    from audioshard.manifest import ManifestError
    from audioshard.remote import SourceError
    from audioshard.stream import ShardDataError
    from audioshard.train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, BuildError, ManifestError, CheckpointError, SourceError, TrainingError, AudioError,
            ShardDataError) as exn:
        print(f"audioshard {args.command}: error: {exn}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
