"""The `audioshard` command: one subcommand per stage, each a thin shell over a library function.

    audioshard demo-data demo/raw                       # synthetic 3-class audio, offline
    audioshard fetch youtube --links links.csv --out raw  # or: fetch drive --label speech --out raw FOLDER_URL
    audioshard build demo/raw --out demo/shards         # raw audio -> shards + manifest.json
    audioshard info demo/shards                         # class balance per split
    audioshard train --shards demo/shards --out demo/run
    audioshard evaluate --checkpoint demo/run/best_model.pt --shards demo/shards --split test --out demo/eval
    audioshard predict --checkpoint demo/run/best_model.pt demo/raw/drone --per-chunk
    audioshard export --checkpoint demo/run/best_model.pt --format onnx --out demo/model.onnx

Every command takes --config FILE and repeated --set section.key=value (see config.toml).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from audioshard import __version__
from audioshard.compat import check_versions
from audioshard.config import Config, dump_toml, load_config
from audioshard.names import EXPORT_FORMATS, FEATURE_PRESETS, PREDICT_FORMATS, SPLITS
from audioshard.termsafe import printable  # every text made from data or files goes out through it

SOURCE_HELP = ("build folder, or an http(s):// or s3://BUCKET/PREFIX/ URL of one (s3: credentials and endpoint "
               "from the standard AWS_* variables)")


def _config(args: argparse.Namespace) -> Config:
    preset = FEATURE_PRESETS[args.preset] if getattr(args, "preset", None) else ()
    return load_config(args.config, [*preset, *(args.set or ())])  # --set wins over the preset


def cmd_demo_data(args: argparse.Namespace) -> int:
    from audioshard.demo import make_demo_data

    counts = make_demo_data(args.dir, seconds_per_class=args.seconds, seed=args.seed)
    print(f"wrote {sum(counts.values())} synthetic recordings to {args.dir}/ "
          f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from audioshard.build import BuildError, build_shards, merge_parts
    from audioshard.info import format_info
    from audioshard.manifest import Manifest

    if args.merge:
        if "://" in args.out:
            raise BuildError("--merge works in a folder: merge the parts there, then build with --parts N --out "
                             "s3://... next time (it uploads the merged build)")
        print(printable(format_info(Manifest(merge_parts(args.out), str(args.out)), str(args.out)), lines=True))
        return 0
    if args.input is None:
        raise BuildError("give an INPUT folder or CSV (or --merge to combine part builds in --out)")
    if args.staging and "://" not in args.out:
        raise BuildError("--staging is where a build for --out s3://... is made first; with a folder as --out "
                         "the build is made there")
    part = None
    if args.part:
        try:
            index, count = (int(v) for v in args.part.split("/"))
        except ValueError as exn:
            raise BuildError(f"--part expects I/N, e.g. --part 0/4; got {args.part!r}") from exn
        part = (index, count)
    cfg = _config(args)
    if args.parts:
        return _build_parts(args, cfg)
    result = build_shards(args.input, args.out, cfg, workers=args.workers, force=args.force,
                          progress=not args.quiet, part=part, staging=args.staging)
    if result.up_to_date:
        print(f"{printable(args.out)}: already built from these inputs and settings; nothing to do (--force rebuilds)")
        return 0
    print(printable(format_info(Manifest(result.manifest, str(args.out)), str(args.out)), lines=True))
    if result.published is not None:
        print(printable(result.published.summary()))
    return 0


def _build_parts(args: argparse.Namespace, cfg: Config) -> int:
    """`build --parts N [--scheduler ADDRESS]`: the parts as tasks on an executor, then merged and verified."""
    from audioshard.build import BuildError
    from audioshard.cluster import ProcessPool, build_on, dask_executor
    from audioshard.info import format_info
    from audioshard.manifest import Manifest

    if args.part or (args.force and "://" not in args.out):
        raise BuildError("--parts runs every part itself: leave out --part (and --force, unless --out is s3://)")
    if args.scheduler:
        client, executor = dask_executor(args.scheduler)
    else:
        client, executor = None, ProcessPool(min(args.parts, os.cpu_count() or 1))
    try:
        manifest = build_on(executor, args.input, args.out, cfg, args.parts, workers=args.workers or 1,
                            log=lambda line: print(printable(line), flush=True), staging=args.staging,
                            force=args.force)
    finally:
        executor.shutdown(wait=True)
        if client is not None:
            client.close()
    print(printable(format_info(Manifest(manifest, str(args.out)), str(args.out)), lines=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from audioshard.info import format_info
    from audioshard.manifest import load_manifest

    manifest = load_manifest(args.source, _config(args).fetcher())  # [shards] timeouts and retries apply
    print(printable(format_info(manifest, args.source, verbose=args.verbose), lines=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from audioshard.info import verify_build

    good, report = verify_build(args.source, _config(args).fetcher())
    print(printable(report, lines=True))
    return 0 if good else 1


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
                                  fetcher=cfg.fetcher(), strict=cfg.shards.strict, adapt=args.adapt)
    adapted = f" (BatchNorm statistics adapted on its {metrics['adapted']} chunks, labels unused)" if args.adapt else ""
    print(f"{args.split} split of {args.shards}{adapted}:")
    for line in iter_metrics_lines(metrics):
        print("  " + line)
    matrix = "" if metrics.get("multilabel") else f"{args.split}_confusion_matrix.png, "
    print(f"reports in {args.out}/: {args.split}_report.txt, {matrix}metrics.json, pred_labels.npy, true_labels.npy")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from audioshard.info import show_chunk

    text = show_chunk(args.source, args.split, args.index, args.out, fetcher=_config(args).fetcher())
    print(printable(text, lines=True))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from audioshard.info import check_pipeline

    cfg = _config(args)
    print(printable(check_pipeline(args.source, args.split, cfg, batches=args.batches), lines=True))
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


def cmd_predict(args: argparse.Namespace) -> int:
    from audioshard.predict import predict_files

    cfg = _config(args)
    summary = predict_files(args.checkpoint, args.inputs, fmt=args.format, per_chunk=args.per_chunk, plot=args.plot,
                            batch_size=args.batch_size, device=cfg.train.device, extensions=cfg.audio.extensions,
                            adapt=args.adapt)
    if summary.plots:
        print(f"wrote {len(summary.plots)} timeline plot(s): {summary.plots[0]}"
              f"{' ...' if len(summary.plots) > 1 else ''}", file=sys.stderr)
    return 0 if summary.predictions else 1


def cmd_export(args: argparse.Namespace) -> int:
    from audioshard.export import export_model, sidecar_path

    info = export_model(args.checkpoint, args.format, args.out)
    print(f"wrote {args.out} ({args.format}; input mel (batch, 1, {info['input']['shape'][2]}, "
          f"{info['input']['shape'][3]}) -> logits over {', '.join(info['classes'])}; max difference from PyTorch "
          f"{info['parity_max_abs_diff']:.1e}) and {sidecar_path(args.out)}")
    return 0


def _acquire(module: str):
    """An acquire module; its downloader (yt-dlp, gdown) is an optional extra."""
    import importlib

    from audioshard.acquire.common import AcquireError

    try:
        return importlib.import_module(f"audioshard.acquire.{module}")
    except ModuleNotFoundError as exn:
        if exn.name not in ("yt_dlp", "gdown"):
            raise
        raise AcquireError(f"`audioshard fetch` needs {exn.name.replace('_', '-')}, which is not installed: "
                           "pip install yt-dlp gdown (from a checkout: pip install -e '.[acquire]')") from exn


def cmd_fetch_youtube(args: argparse.Namespace) -> int:
    youtube = _acquire("youtube")
    collect_links, fetch_youtube = youtube.collect_links, youtube.fetch_youtube

    _config(args)  # validates --config/--set like every command
    if args.audioset is not None:
        return _fetch_audioset(args)
    if args.ontology is not None or args.classes:
        raise youtube.AcquireError("--ontology and --classes go with --audioset LIST.csv (an AudioSet segment list)")
    links = collect_links(args.urls, args.label, args.links)
    summary = fetch_youtube(links, args.out, max_items=args.max_items, audio_format=args.audio_format,
                            retries=args.retries, timeout=args.timeout, log=print)
    print(summary.format())
    return summary.exit_code


def _fetch_audioset(args: argparse.Namespace) -> int:
    audioset = _acquire("audioset")
    # The other inputs name one class per link; an AudioSet list names its own (several per clip).
    mixed = [flag for flag, given in (("URLs", args.urls), ("--links", args.links), ("--label", args.label),
                                      ("--max-items", args.max_items)) if given]
    if mixed:
        raise audioset.AcquireError(f"--audioset takes its videos and labels from the list: drop {', '.join(mixed)} "
                                    "(or fetch them in a separate command)")
    summary = audioset.fetch_audioset(args.audioset, args.out, ontology=args.ontology, classes=args.classes or (),
                                      audio_format=args.audio_format, retries=args.retries, timeout=args.timeout,
                                      log=print)
    print(summary.format())
    return summary.exit_code


def cmd_fetch_drive(args: argparse.Namespace) -> int:
    fetch_drive = _acquire("drive").fetch_drive

    cfg = _config(args)
    summary = fetch_drive(args.folders, args.label, args.out, extensions=cfg.audio.extensions, retries=args.retries,
                          timeout=args.timeout, log=print)
    print(summary.format())
    return summary.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from audioshard.report import write_report

    print(f"wrote {printable(write_report(args.run, args.shards, _config(args).fetcher()))}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_toml(_config(args)), end="")
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (see config.toml); defaults otherwise")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)")


def _add_preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(FEATURE_PRESETS),
                        help="features of a pretrained network: panns16k (PANNs Cnn14_16k), panns32k (PANNs Cnn6, "
                        "Cnn14); sets [audio] sample_rate and [features], before any --set (docs/models.md)")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where it says something: not "(default: None)" or "(default: False)" (the option is
    simply off), nor a second time where the help text already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


class _ExamplesHelpFormatter(_DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, and keeps description/epilog line breaks (file formats, examples)."""


FETCH_YOUTUBE_HELP = """\
Download the best audio-only format of each video with yt-dlp (YouTube videos, playlists and
channels, any other site yt-dlp supports, direct links to audio files, podcast RSS feeds), extract
it to WAV or FLAC with ffmpeg, and write RAW/<label>/<id>[_<start>-<end>].wav plus one provenance
row in RAW/sources.csv (URL, video id, title, uploader, duration, segment, licence, download time),
which `audioshard build` copies into the manifest. sources.csv is also the download archive: a
re-run fetches only what is new. Private, removed, age-restricted and geo-blocked videos are
reported and skipped; transient errors are retried with backoff. The exit status is 1 only when
nothing could be fetched.

Link file (header required; start/end optional, seconds or [hh:]mm:ss; lines starting with # are
skipped; an empty label takes --label):
  url,label,start,end
  https://www.youtube.com/watch?v=VIDEO_ID,drone,0:30,1:45
  https://www.youtube.com/playlist?list=PLAYLIST_ID,car,,
  https://example.org/recordings/street.flac,car,,

Without ffmpeg, segments are refused and whole recordings are kept in their container (.webm,
.m4a), which `audioshard build` then also needs ffmpeg to decode.

AudioSet segment list (--audioset; labels are ontology ids, named with --ontology ontology.json):
  # YTID, start_seconds, end_seconds, positive_labels
  --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
Clips go to RAW/audioset/<id>_<start>-<end>.wav, and RAW/audioset.csv (path,label,group; several
labels joined by ';', group = video id) is what `audioshard build` reads (docs/acquire.md)."""

FETCH_YOUTUBE_EXAMPLES = """\
examples:
  audioshard fetch youtube --label drone --out raw/ https://www.youtube.com/watch?v=VIDEO_ID
  audioshard fetch youtube --links links.csv --out raw/ --max-items 20
  audioshard build raw/ --out shards/
  audioshard fetch youtube --audioset balanced_train_segments.csv --ontology ontology.json \
      --classes Speech Car --out raw-audioset/
  audioshard build raw-audioset/audioset.csv --out shards-audioset/"""

FETCH_DRIVE_HELP = """\
Download the audio files (audio.extensions) of Google Drive folders, recursively, with gdown.
The folder must be shared as "Anyone with the link". Files keep their names and subfolders under
RAW/<label>/ (made safe; a taken name gets -2), each with a provenance row in RAW/sources.csv;
a re-run fetches only files not fetched before. A file over its download quota or without access
is reported with the reason and the rest still come. gdown < 6 lists at most 50 files per folder:
that is detected and reported with what to do."""

FETCH_DRIVE_EXAMPLES = """\
examples:
  audioshard fetch drive --label speech --out raw/ https://drive.google.com/drive/folders/FOLDER_ID
  audioshard fetch drive --label speech --out raw/ FOLDER_ID OTHER_FOLDER_ID"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"audioshard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, description: str = ""):
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=_DefaultsHelpFormatter)
        p.set_defaults(handler=handler)
        _add_config_args(p)
        return p

    _data_commands(add)
    _training_commands(add)
    _model_commands(add)
    _fetch_commands(sub)
    _add_preset(add("config", cmd_config, "print the resolved settings as TOML (defaults + --config + --set)"))
    return parser



def _data_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """demo-data, build, info, verify, clean: making and looking after builds."""
    p = add("demo-data", cmd_demo_data, "write a small synthetic 3-class data set (drone, engine, voice)",
            "Synthesise a few minutes of 3-class audio with a fixed seed: drone-like harmonic buzz, engine-like "
            "rumble and formant-like voice. Synthetic: a pipeline check, not a benchmark.")
    p.add_argument("dir", type=Path, help="output folder (one subfolder per class)")
    p.add_argument("--seconds", type=float, default=90.0, help="seconds of audio per class")
    p.add_argument("--seed", type=int, default=0, help="random seed")

    p = add("build", cmd_build, "turn raw audio into train/val/test WebDataset shards + manifest.json",
            "Decode, resample, chunk and featurise every recording, split by recording (no leakage), and write "
            "shards. INPUT is a folder with one subfolder per class (or an s3:// or gs:// prefix laid out the "
            "same way), or a CSV with columns path,label and optional group,split, whose paths may be s3://, "
            "gs:// or http(s):// URLs. Corrupt or unreachable files are reported and skipped (see `audioshard "
            "info`). --out s3://BUCKET/PREFIX/ builds locally, then uploads (manifest last; unchanged objects "
            "are not uploaded again).")
    p.add_argument("input", nargs="?", help="class-per-folder directory, s3://BUCKET/PREFIX/ or gs:// prefix, "
                   "or CSV file")
    p.add_argument("--out", default="shards", help="output folder, or s3://BUCKET/PREFIX/ (credentials and "
                   "endpoint from the standard AWS_* variables)")
    p.add_argument("--staging", metavar="DIR", help="with --out s3://: build here first (kept; with --scheduler "
                   "on several machines, a folder every worker sees); default: a temporary folder")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: shards.workers, 0 = all cores)")
    p.add_argument("--force", action="store_true", help="replace what is in --out")
    p.add_argument("--part", metavar="I/N", help="build only part I of N into OUT/part-I-of-N/ (job arrays: run "
                   "I = 0..N-1 anywhere, then --merge)")
    p.add_argument("--merge", action="store_true", help="write OUT/manifest.json over the finished part builds in OUT")
    p.add_argument("--parts", type=int, metavar="N", help="build in N parts at once, each a task on a pool of local "
                   "processes or on --scheduler's cluster, retried if it fails, then merged and verified")
    p.add_argument("--scheduler", metavar="ADDRESS", help="with --parts: a Dask cluster (tcp://host:8786), or "
                   "'local' for a Dask LocalCluster here; needs the `distributed` package")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_preset(p)

    p = add("info", cmd_info, "print a build's manifest as tables (class balance per split)")
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--verbose", "-v", action="store_true", help="list every skipped file and shard")

    p = add("verify", cmd_verify, "check every shard against the manifest (size, sha256, blocks, counts)",
            "Read every shard of a build (folder or URL) and check it against manifest.json. Exit status 1 "
            "when anything is wrong, with each bad shard named.")
    p.add_argument("source", help=SOURCE_HELP)

    p = add("clean", cmd_clean, "remove what a build wrote (refuses folders that are not builds)")
    p.add_argument("dir", type=Path, help="build folder")


def _training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """train, evaluate, and show, check, serve: training on builds and looking inside them."""
    p = add("train", cmd_train, "train a classifier by streaming shards",
            "Train on a build's shards (folder or URL). Writes best_model.pt, last.pt, history.jsonl, "
            "metrics.json, val/test reports and confusion matrices, pred_labels.npy/true_labels.npy into --out. "
            "Multi-GPU: torchrun --nproc_per_node=N -m audioshard train ...")
    p.add_argument("--shards", required=True, help=SOURCE_HELP)
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", cmd_evaluate, "evaluate a checkpoint on one split (chunk- and recording-level)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a best_model.pt or last.pt (or a model.safetensors export)")
    p.add_argument("--shards", required=True, help=SOURCE_HELP)
    p.add_argument("--split", default="test", choices=SPLITS, help="which split")
    p.add_argument("--out", type=Path, required=True, help="folder for reports")
    p.add_argument("--adapt", action="store_true",
                   help="first re-estimate the model's BatchNorm statistics on this split's chunks (no labels "
                        "used): for a split that is data from a new speaker, microphone or site (cnn6 only)")

    p = add("report", cmd_report, "(re)write RUN/report.html: one self-contained page about a training run",
            "Data, settings, curves, confusion, per-class scores, the recordings the model gets most wrong (with "
            "their spectrograms) and the run's cost, in one HTML file with everything inline. `train` writes it "
            "at the end; this rewrites it.")
    p.add_argument("run", type=Path, help="a run folder of `audioshard train`")
    p.add_argument("--shards", help="the build, if it has moved since training (default: where metrics.json says)")

    p = add("show", cmd_show, "plot one chunk's mel spectrogram with its label, source and time")
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--split", default="train", choices=SPLITS, help="which split")
    p.add_argument("--index", type=int, default=0, help="chunk number within the split (shard order)")
    p.add_argument("--out", type=Path, default=Path("chunk.png"), help="PNG to write")

    p = add("check", cmd_check, "pull a few batches through the real pipeline and describe them")
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--split", default="train", choices=SPLITS, help="which split")
    p.add_argument("--batches", type=int, default=3, help="batches to pull")

    p = add("serve", cmd_serve, "serve a build folder over HTTP (train from it with --shards http://HOST:PORT/)")
    p.add_argument("dir", type=Path, help="build folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")


def _model_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """predict, export: using a trained model."""
    p = add("predict", cmd_predict, "predict the class of new recordings (any format, rate and length)",
            "Predict each recording's class with a trained checkpoint: the softmax of the mean of its chunks' "
            "logits, computed with exactly the training features (parameters, normalisation and chunking come "
            "from the checkpoint). Long recordings are streamed in blocks, never loaded whole. Folders are "
            "searched recursively for audio.extensions. A file that cannot be decoded is reported and counted; "
            "the exit status is 1 only when no file could be predicted. Example: audioshard predict --checkpoint "
            "runs/first/best_model.pt field/ night.flac --per-chunk --format csv > predictions.csv")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="recordings, or folders of them")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a best_model.pt from `audioshard train`, or a model.safetensors from `audioshard export`")
    p.add_argument("--format", default="table", choices=PREDICT_FORMATS,
                   help="table for people; csv (one row per file, or per chunk with --per-chunk); json")
    p.add_argument("--per-chunk", action="store_true", help="add a timeline: each chunk's start, end, class, "
                   "probability")
    p.add_argument("--plot", type=Path, metavar="OUT.png|DIR", help="write a probability-over-time PNG: a .png "
                   "for one file, a folder for many")
    p.add_argument("--batch-size", type=int, default=64, help="chunks per forward pass (bounds memory)")
    p.add_argument("--adapt", action="store_true",
                   help="first re-estimate the model's BatchNorm statistics on all the given recordings (no "
                        "labels; cnn6 only): for a batch from a new speaker, microphone or site, which should be "
                        "a mix of classes (at least 20 chunks). Much better on voices or devices unlike the "
                        "training ones (README, Results); harmful on recordings of one class only")

    p = add("export", cmd_export, "export a model: safetensors to share it, ONNX or TorchScript to run it elsewhere",
            "safetensors: the weights in the format people share them in, with OUT.json describing the rest; "
            "`audioshard predict --checkpoint OUT` reads the pair, never unpickling anything. ONNX and "
            "TorchScript run without audioshard. Input: normalised log-mel (batch, 1, n_mels, frames) "
            "float32, any batch size; output: logits (batch, classes). OUT.json beside it holds the classes, "
            "feature parameters, chunking and normalisation. The export is loaded back and checked against "
            "PyTorch before it is kept. ONNX needs: pip install -e '.[export]'. Example: audioshard export "
            "--checkpoint runs/first/best_model.pt --format safetensors --out model.safetensors")
    p.add_argument("--checkpoint", type=Path, required=True, help="a best_model.pt from `audioshard train`")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="export format")
    p.add_argument("--out", type=Path, required=True, help="file to write (the sidecar is OUT.json)")


def _fetch_commands(sub) -> None:
    """fetch youtube, fetch drive: the acquire stage."""
    p = sub.add_parser("fetch", help="download labelled audio (YouTube and other yt-dlp sites, Google Drive) "
                       "into RAW/<label>/ with provenance", description="Build a class-per-folder RAW tree from "
                       "the web: `audioshard fetch youtube --help`, `audioshard fetch drive --help`.")
    fetch = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    p = fetch.add_parser("youtube", help="yt-dlp: videos, playlists, channels, direct audio links",
                         description=FETCH_YOUTUBE_HELP, epilog=FETCH_YOUTUBE_EXAMPLES,
                         formatter_class=_ExamplesHelpFormatter)
    p.set_defaults(handler=cmd_fetch_youtube)
    _add_config_args(p)
    p.add_argument("urls", nargs="*", metavar="URL", help="video, playlist or channel URLs (need --label)")
    p.add_argument("--label", help="class folder for the URLs (and for link-file rows without a label)")
    p.add_argument("--links", type=Path, metavar="FILE", help="CSV with columns url,label[,start,end]")
    p.add_argument("--audioset", type=Path, metavar="LIST.csv", help="AudioSet segment list (YTID, start_seconds, "
                   "end_seconds, positive_labels): fetch its clips into OUT/audioset/ and write OUT/audioset.csv")
    p.add_argument("--ontology", type=Path, metavar="FILE", help="AudioSet's ontology.json, to name --audioset "
                   "labels (default: the ids, e.g. /m/09x0r as m_09x0r)")
    p.add_argument("--classes", nargs="+", metavar="NAME", help="with --audioset: keep only these classes "
                   "(ontology names or ids); segments with none of them are not fetched")
    p.add_argument("--out", type=Path, default=Path("raw"), help="RAW folder: files go into OUT/<label>/")
    p.add_argument("--max-items", type=int, metavar="N", help="at most N videos from each playlist or channel "
                   "(None: all)")
    p.add_argument("--audio-format", default="wav", choices=["wav", "flac"], help="what ffmpeg extracts to")
    p.add_argument("--retries", type=int, default=3, help="further attempts after a transient error (backoff 2, 4, "
                   "8 s...)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent connection is dropped")

    p = fetch.add_parser("drive", help="gdown: shared Google Drive folders, recursively",
                         description=FETCH_DRIVE_HELP, epilog=FETCH_DRIVE_EXAMPLES,
                         formatter_class=_ExamplesHelpFormatter)
    p.set_defaults(handler=cmd_fetch_drive)
    _add_config_args(p)
    p.add_argument("folders", nargs="+", metavar="FOLDER_ID_OR_URL", help="Drive folder URLs or ids")
    p.add_argument("--label", required=True, help="class folder the files go into")
    p.add_argument("--out", type=Path, default=Path("raw"), help="RAW folder: files go into OUT/<label>/")
    p.add_argument("--retries", type=int, default=3, help="further attempts after a network error (backoff 2, 4, "
                   "8 s...)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds gdown waits for the server (gdown >= 6)")


NO_TORCH_COMMANDS = ("config",)


def main(argv: list[str] | None = None) -> int:
    from audioshard.errors import AudioshardError

    args = build_parser().parse_args(argv)
    try:
        if args.command not in NO_TORCH_COMMANDS:
            check_versions()  # an untested torch/torchaudio pair: say so now, not as a failure deep in a run
        return args.handler(args)
    except AudioshardError as exn:  # every stage's error: the message names the file and the fix
        print(f"audioshard {args.command}: error: {printable(exn, lines=True)}", file=sys.stderr)
        return 2
    except OSError as exn:  # the machine, not the data: a full disk, a permission, a vanished file
        where = f": {printable(exn.filename)}" if exn.filename else ""
        print(f"audioshard {args.command}: error: {printable(exn.strerror or exn, lines=True)}{where}; free some "
              "space or fix the permission, then run the same command again (--resume for train)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
