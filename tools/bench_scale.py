"""How audioshard grows with the data: 1x, 10x and 100x copies of one data set, built, streamed and verified.

What it measures, per size (each step a fresh process, so no step inherits another's caches or heap)
    build         `audioshard build COPIES --out B --quiet` with the default config: wall seconds,
                  audio seconds per wall second, peak RSS of the largest process (the main process or
                  one of its decode workers; `ru_maxrss` of the children).
    manifest      bytes of manifest.json (what every process and loader worker parses), side files
                  (per-split lists read only by evaluate/info/report) and the shard count.
    first batch   a fresh process: `open_shards(B, "train", batch_size=64, num_workers=2)`, the time
                  from the call to the first batch (manifest parse, workers start, first shard read,
                  checked and shuffled), then the peak RSS of the largest loader worker.
    verify        `audioshard verify B` (every shard re-read and hashed): wall seconds.

The copies are symbolic links (COPY_i/CLASS/file -> the original), so a 100x set costs no disk; every
copy is a distinct recording to the build (its own path), which is what a data set 100x larger looks like
to it. Audio seconds come from `soundfile.info` of the originals, times the number of copies.

With --cluster, per size instead (same linked input, each a fresh process):
    one process   `audioshard build COPIES --out B1 --workers 1 --quiet`: wall seconds, audio seconds per wall
                  second (per core when the machine is pinned to one core).
    cluster       `audioshard build COPIES --out B2 --parts 2 --scheduler local`: a Dask LocalCluster of 2
                  single-threaded worker processes, the parts merged and verified inside the command.
    merge         `audioshard build --out B2 --merge` again: the cost of the merge alone.
    verify        `audioshard verify B2`: every shard re-read and hashed.
    bytes         raw audio in, shard bytes out, manifest and list files, each also per hour of audio.

Commands (from the repository root)
    .venv/bin/python tools/bench_scale.py                        # 1x 10x 100x of ../shared/data/drone_car_speech
    .venv/bin/python tools/bench_scale.py --sizes 1 10 --json     # quick
    taskset -c 0 .venv/bin/python tools/bench_scale.py --cluster --sizes 1 10   # one process vs a LocalCluster

How to read it
    Each column should grow linearly (build and verify time, shards) or not at all (first batch, RSS,
    manifest: per-recording lists live in side files); `per 1x` divides by the copy count, so a flat
    `per 1x` column means linear growth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "drone_car_speech"
AUDIO = (".wav", ".flac", ".ogg", ".mp3")

FIRST_BATCH = """
import resource, sys, time
t = time.monotonic()
from audioshard.loader import open_shards
loader = open_shards(sys.argv[1], "train", batch_size=64, num_workers=2)
batches = iter(loader)
next(batches)
seconds = time.monotonic() - t
del batches  # the workers exit and are reaped: their peak RSS is now in RUSAGE_CHILDREN
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def link_copies(source: Path, target: Path, copies: int) -> int:
    """COPY_i/CLASS/NAME -> source/CLASS/NAME for every audio file; returns the files per copy."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO)
    for i in range(copies):
        for path in files:
            link = target / f"copy{i:04d}" / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return len(files)


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the largest descendant, stdout) of a command in a fresh process."""
    measure = ("import resource, subprocess, sys, time; t = time.monotonic(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(p.stderr); print(p.stdout, end=''); "
               "print(f'\\n@@ {time.monotonic() - t} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
               "sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    body, _, tail = proc.stdout.rpartition("\n@@ ")
    wall, rss_kb = tail.split()
    return float(wall), int(rss_kb) / 1024, body


def measure_size(source: Path, copies: int, audio_seconds: float, work: Path) -> dict:
    raw, build = work / f"raw{copies}", work / f"build{copies}"
    per_copy = link_copies(source, raw, copies)
    cli = [sys.executable, "-m", "audioshard"]
    build_s, build_rss, _ = run_measured([*cli, "build", str(raw), "--out", str(build), "--quiet"])
    manifest = json.loads((build / "manifest.json").read_text())
    shards = sum(len(info["shards"]) for info in manifest["splits"].values())
    side = sum(p.stat().st_size for p in build.iterdir() if p.suffix == ".jsonl")  # the list files
    first = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(build)], capture_output=True, text=True,
                           check=True).stdout.split()
    verify_s, _, _ = run_measured([*cli, "verify", str(build)])
    return {"copies": copies, "files": per_copy * copies, "audio_hours": round(copies * audio_seconds / 3600, 1),
            "build_s": round(build_s, 1), "audio_s_per_s": round(copies * audio_seconds / build_s),
            "build_peak_rss_mb": round(build_rss), "manifest_bytes": (build / "manifest.json").stat().st_size,
            "side_file_bytes": side, "shards": shards, "first_batch_s": round(float(first[0]), 2),
            "worker_peak_rss_mb": round(int(first[1]) / 1024), "verify_s": round(verify_s, 1)}


def measure_cluster(source: Path, copies: int, audio_seconds: float, work: Path) -> dict:
    """One-process build vs `--parts 2 --scheduler local` of the same linked input, then merge and verify alone."""
    raw, one, parts = work / f"raw{copies}", work / f"one{copies}", work / f"parts{copies}"
    per_copy = link_copies(source, raw, copies)
    cli = [sys.executable, "-m", "audioshard"]
    one_s, _, _ = run_measured([*cli, "build", str(raw), "--out", str(one), "--workers", "1", "--quiet"])
    cluster_s, _, _ = run_measured([*cli, "build", str(raw), "--out", str(parts), "--parts", "2", "--scheduler",
                                    "local", "--quiet"])
    merge_s, _, _ = run_measured([*cli, "build", "--out", str(parts), "--merge"])
    verify_s, _, _ = run_measured([*cli, "verify", str(parts)])
    manifest = json.loads((parts / "manifest.json").read_text())
    hours = copies * audio_seconds / 3600
    lists = sum(p.stat().st_size for p in parts.iterdir() if p.suffix == ".jsonl")
    return {"copies": copies, "files": per_copy * copies, "audio_hours": round(hours, 2),
            "one_process_s": round(one_s, 1), "cluster_s": round(cluster_s, 1), "merge_s": round(merge_s, 1),
            "verify_s": round(verify_s, 1), "audio_s_per_s_one": round(hours * 3600 / one_s),
            "audio_s_per_s_cluster": round(hours * 3600 / cluster_s),
            "raw_bytes": copies * sum(p.stat().st_size for p in source.rglob("*") if p.suffix.lower() in AUDIO),
            "shard_bytes": sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"]),
            "manifest_bytes": (parts / "manifest.json").stat().st_size, "list_bytes": lists}


def cluster_table(rows: list[dict]) -> str:
    head = ("| copies | files | audio h | one process s | audio s/s | --parts 2 --scheduler local s | audio s/s "
            "| merge s | verify s | raw MB in | shard MB out | shard MB per audio h | manifest KB | list files KB "
            "per audio h |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['copies']} | {r['files']:,} | {r['audio_hours']} | {r['one_process_s']} "
                     f"| {r['audio_s_per_s_one']:,} | {r['cluster_s']} | {r['audio_s_per_s_cluster']:,} "
                     f"| {r['merge_s']} | {r['verify_s']} | {r['raw_bytes'] / 1e6:,.0f} "
                     f"| {r['shard_bytes'] / 1e6:,.0f} "
                     f"| {r['shard_bytes'] / 1e6 / r['audio_hours']:,.0f} | {r['manifest_bytes'] / 1024:.1f} "
                     f"| {r['list_bytes'] / 1024 / r['audio_hours']:.1f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| copies | files | audio h | build s | audio s/s | build peak RSS MB | manifest KB | side files KB "
            "| shards | first batch s | worker peak RSS MB | verify s | build s per 1x | verify s per 1x |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['copies']} | {r['files']:,} | {r['audio_hours']} | {r['build_s']} "
                     f"| {r['audio_s_per_s']:,} | {r['build_peak_rss_mb']} | {r['manifest_bytes'] / 1024:.1f} "
                     f"| {r['side_file_bytes'] / 1024:.1f} "
                     f"| {r['shards']} | {r['first_batch_s']} | {r['worker_peak_rss_mb']} | {r['verify_s']} "
                     f"| {r['build_s'] / r['copies']:.2f} | {r['verify_s'] / r['copies']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="one subfolder per class")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="copy counts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--cluster", action="store_true", help="one-process build vs --parts 2 --scheduler local "
                        "(needs the `distributed` package), merge and verify, bytes per audio hour")
    args = parser.parse_args()
    audio_seconds = sum(soundfile.info(str(p)).duration for p in sorted(args.input.rglob("*"))
                        if p.suffix.lower() in AUDIO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as work:
        for copies in args.sizes:
            measure = measure_cluster if args.cluster else measure_size
            rows.append(measure(args.input.resolve(), copies, audio_seconds, Path(work)))
            print(f"{copies}x done: {rows[-1]}", file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1) if args.json else (cluster_table if args.cluster else table)(rows))
    print(f"\n{os.cpu_count()} cores, {len(os.sched_getaffinity(0))} usable here; {time.strftime('%Y-%m-%d')}; peak "
          f"RSS from ru_maxrss ({resource.getpagesize()}-byte pages)", file=sys.stderr)


if __name__ == "__main__":
    main()
