"""Benchmark `audioshard build` against the seed's way of preparing the same audio.

What it measures
    Throughput of turning a folder of labelled recordings into training features, in audio seconds
    processed per wall-clock second, for two methods on the same files and the same machine:

    seed (npz)  the original system, reimplemented here faithfully: per file `librosa.load(path,
                sr=16000, mono=True)` (librosa's default resampler), 2 s chunks (a trailing partial
                chunk is zero-padded when it holds >= 50 % of a chunk, shorter clips are padded),
                per chunk `librosa.feature.melspectrogram(n_fft=1024, hop_length=512, n_mels=64)`
                and `librosa.power_to_db(ref=np.max)`, one `np.savez_compressed` file per chunk, then
                a metadata CSV and a chunk-level random train/val/test split CSV (pandas).
    audioshard  `audioshard.build.build_shards(...)` with the default config: decode, resample,
                chunk, batched torchaudio log-mel, leak-free split, WebDataset tars + manifest.

    Both run with 1 and 2 worker processes (`--workers`), in-process for 1 worker. With N workers the
    seed's way uses a multiprocessing pool of N (fork on Linux) with `imap(chunksize=1)` over files,
    results back to the main process, which writes the CSVs; audioshard's calling process works beside
    N - 1 forked helpers and writes the shards (its own design, see `audioshard.parallel.ordered_map`).
    The seed's processes start with OMP/MKL/OpenBLAS/numba threads pinned to 1, so its "1 worker"
    really is one core; audioshard's start without any such setting, as `audioshard build` does in a
    plain shell (it keeps each of its processes to one thread itself: torch.set_num_threads, no BLAS).

What is timed
    Every run (one method, one worker count) is a fresh Python process (this script with an internal
    `--child` flag), so no run inherits another's caches: the first build in a process pays one-off
    costs (oneDNN compiles a conv1d kernel per new input length in torchaudio's resampler, the heap
    grows) that a real `audioshard build` pays too. In that process, not timed: imports, listing the
    files, and a warm-up of the method on a tiny input (librosa's lazy imports and numba JIT; the
    torchaudio mel filter bank). Timed with `time.perf_counter()`: the whole build, including pool
    start-up (and, for the seed, the pool initializer that re-runs the warm-up in each worker, cheap
    since forked workers inherit the warmed-up parent), writing into a fresh folder under a
    `tempfile.TemporaryDirectory`. The audio duration (the numerator) is read once with
    `soundfile.info` over the benchmarked files and used for both methods. With `--repeat N` all
    configurations run N times, interleaved, and the fastest run of each is reported; beside it, the
    median (and range) of the ratios taken within each repetition, whose runs follow each other
    within seconds and so share the host's speed of the moment.

Commands (from the repository root)
    .venv/bin/python tools/bench_build.py                       # whole data set, 1 and 2 workers
    .venv/bin/python tools/bench_build.py --limit 20            # quick: 20 files per class
    .venv/bin/python tools/bench_build.py --workers 1 2 4 --repeat 3 --json > bench.json

    --input DIR   one subfolder per class (default ../shared/data/drone_car_speech)
    --workers N.. worker counts to compare (default 1 2); the first is the base of the speed-up
    --repeat N    runs per (method, workers); the fastest is reported (default 1)
    --limit N     use only the first N files (sorted) of each class
    --json        print one JSON object on stdout instead of the table

How to read it
    `audio s / wall s` is the throughput (higher is better). `CPU s` is the CPU time the build used in
    all its processes (more than `wall s` x 1 with 1 worker means overhead outside the work itself;
    with N workers, CPU s above the 1-worker figure is the price of parallelism). `others (cores)` is
    how many cores other programs kept busy meanwhile, on average (from /proc/stat): above 0.1 the
    run was disturbed, and the table says so. `ratio audioshard / seed` is how many times faster
    audioshard is than the seed's way with the same worker count (target: >= 5x with 1 worker).
    `speed-up 1 -> 2 workers` is each method's throughput with 2 workers over its own with 1
    (target for audioshard: >= 1.7x; the ceiling is the number of free cores, and the main process,
    which writes the output, needs CPU too). Beside it, `N independent 1-worker builds at once`: N
    separate processes each running the whole 1-worker build at the same time, their total throughput
    over one alone. They share nothing but the machine (no pool, no IPC, no main process), so this is
    what N cores of this machine give this workload at best, the ceiling for the N-worker speed-up
    (below N where cores share caches, memory bandwidth or a host). Targets are reported, never asserted. On a busy
    machine, use `--repeat 3`: configurations are interleaved and the fastest run of each is kept.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from audioshard.audio import resample
from audioshard.build import build_shards
from audioshard.config import Config, load_config
from audioshard.features import FeatureParams, log_mel

# The seed's runs: one thread per process (numpy's BLAS, numba), so N workers use N cores. Set in the
# environment of the seed's child processes only: audioshard's runs get no such help, so they measure
# what `audioshard build` does in a plain shell (it keeps itself to one thread per process).
SEED_THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "NUMBA_NUM_THREADS")}

DEFAULT_INPUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drone_car_speech"
TARGET_RATIO_1_WORKER = 5.0
TARGET_SPEEDUP_1_TO_2 = 1.7
BUSY_CORES = 0.1  # other programs' average load during a run above which the table warns that it is noisy

# The seed's fixed settings.
SEED_SAMPLE_RATE = 16000
SEED_CHUNK_SECONDS = 2.0
SEED_MIN_FRACTION = 0.5
SEED_N_FFT, SEED_HOP, SEED_N_MELS = 1024, 512, 64
SEED_SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}
SEED_SPLIT_RANDOM_STATE = 42

# The seed's libraries, imported by `seed_warmup` in the seed's own runs only: audioshard's runs then
# happen in a process like `audioshard build`'s. (librosa, numba and pandas add ~220 MB of loaded
# libraries, which made forking a build helper take 18-20 ms instead of 8-10 ms.)
librosa: Any = None
pd: Any = None

METHODS = ("seed", "audioshard")
LABELS = {"seed": "seed (npz)", "audioshard": "audioshard"}


@dataclass(frozen=True)
class Recording:
    """One input file: absolute path, path relative to the input folder, class name."""

    path: Path
    rel: str
    label: str


def list_recordings(input_dir: Path, extensions: Iterable[str], limit: int | None) -> list[Recording]:
    """The audio files of a class-per-folder tree, as audioshard discovers them (sorted, no hidden files).

    Args:
        input_dir: folder with one subfolder per class.
        extensions: audio file extensions (lower case, with the dot).
        limit: keep only the first `limit` files of each class (None: all).
    """
    extensions = {e.lower() for e in extensions}
    found: list[Recording] = []
    for class_dir in sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in sorted(class_dir.rglob("*"))
                 if p.is_file() and p.suffix.lower() in extensions
                 and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)]
        for path in files[:limit] if limit is not None else files:
            found.append(Recording(path.resolve(), path.relative_to(input_dir).as_posix(), class_dir.name))
    return found


def total_seconds(recordings: list[Recording]) -> float:
    """Sum of the recordings' durations in seconds (from the file headers)."""
    total = 0.0
    for rec in recordings:
        info = sf.info(str(rec.path))
        total += info.frames / info.samplerate
    return total


def link_subset(recordings: list[Recording], dest: Path) -> Path:
    """A class-per-folder tree of symlinks to `recordings` (for `--limit`: audioshard takes a folder)."""
    for rec in recordings:
        link = dest / rec.rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(rec.path)
    return dest


# ----------------------------------------------------------------------------------------------
# The seed's way


def seed_chunks(y: np.ndarray, chunk: int, min_fraction: float = SEED_MIN_FRACTION) -> list[np.ndarray]:
    """Cut a clip into chunks the way the seed did.

    Args:
        y: (N,) float32 mono audio.
        chunk: chunk length in samples.
        min_fraction: a trailing partial chunk is zero-padded and kept if it holds this fraction of a chunk.

    Returns:
        Chunks of shape (chunk,); a clip shorter than one chunk gives one zero-padded chunk.
    """
    if len(y) < chunk:
        return [np.pad(y, (0, chunk - len(y)))]
    chunks = [y[start:start + chunk] for start in range(0, len(y) - chunk + 1, chunk)]
    rest = len(y) % chunk
    if rest and rest >= min_fraction * chunk:
        chunks.append(np.pad(y[len(y) - rest:], (0, chunk - rest)))
    return chunks


def seed_process_file(job: tuple[str, int, str]) -> list[tuple[str, int, str]]:
    """The seed's per-file work: load, chunk, log-mel each chunk, one compressed .npz per chunk.

    Args:
        job: (audio path, class index, output folder).

    Returns:
        Metadata rows (audio path, class index, chunk file), one per chunk.
    """
    path, label, out_dir = job
    y, sr = librosa.load(path, sr=SEED_SAMPLE_RATE, mono=True)
    stem = Path(path).stem
    rows = []
    for i, chunk in enumerate(seed_chunks(y, int(SEED_CHUNK_SECONDS * sr))):
        mel = librosa.feature.melspectrogram(y=chunk, sr=sr, n_fft=SEED_N_FFT, hop_length=SEED_HOP,
                                             n_mels=SEED_N_MELS)
        mel_db = librosa.power_to_db(mel, ref=np.max)
        chunk_file = os.path.join(out_dir, f"{stem}_{i}.npz")
        np.savez_compressed(chunk_file, mel=mel_db, label=label)
        rows.append((path, label, chunk_file))
    return rows


def seed_warmup() -> None:
    """Import the seed's libraries and run each librosa step once on a tiny input: triggers numba JIT and
    lazy imports (not timed)."""
    global librosa, pd
    librosa, pd = importlib.import_module("librosa"), importlib.import_module("pandas")
    rng = np.random.default_rng(0)
    y = librosa.resample(rng.standard_normal(8000).astype(np.float32), orig_sr=8000, target_sr=SEED_SAMPLE_RATE)
    chunk = seed_chunks(y, int(SEED_CHUNK_SECONDS * SEED_SAMPLE_RATE))[0]
    mel = librosa.feature.melspectrogram(y=chunk, sr=SEED_SAMPLE_RATE, n_fft=SEED_N_FFT, hop_length=SEED_HOP,
                                         n_mels=SEED_N_MELS)
    np.savez_compressed(io.BytesIO(), mel=librosa.power_to_db(mel, ref=np.max), label=0)


def _pool_context() -> mp.context.BaseContext:
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _seed_rows(jobs: list[tuple[str, int, str]], workers: int) -> Iterator[list[tuple[str, int, str]]]:
    if workers <= 1:
        yield from map(seed_process_file, jobs)
        return
    with _pool_context().Pool(workers, initializer=seed_warmup) as pool:
        yield from pool.imap(seed_process_file, jobs, chunksize=1)


def seed_build(recordings: list[Recording], out_dir: Path, workers: int) -> int:
    """The seed's whole preparation: per-chunk .npz files, metadata CSV, chunk-level random split CSV.

    Args:
        recordings: files to process.
        out_dir: output folder (created).
        workers: processes; 1 runs in this process.

    Returns:
        Number of chunks written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = sorted({rec.label for rec in recordings})
    jobs = [(str(rec.path), classes.index(rec.label), str(out_dir)) for rec in recordings]
    rows = [row for file_rows in _seed_rows(jobs, workers) for row in file_rows]
    meta = pd.DataFrame(rows, columns=["path", "label", "chunk_file"])
    meta.to_csv(out_dir / "metadata.csv", index=False)
    # The seed split chunks at random (neighbouring chunks of one recording land in different splits).
    shuffled = meta.sample(frac=1.0, random_state=SEED_SPLIT_RANDOM_STATE).reset_index(drop=True)
    n_train = int(len(shuffled) * SEED_SPLIT["train"])
    n_val = int(len(shuffled) * SEED_SPLIT["val"])
    shuffled["split"] = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(shuffled) - n_train - n_val)
    shuffled.to_csv(out_dir / "split.csv", index=False)
    return len(meta)


# ----------------------------------------------------------------------------------------------
# audioshard


def audioshard_warmup(cfg: Config) -> None:
    """Run resampling and the log-mel once on a tiny input (mel filter bank built and cached; not timed)."""
    params = FeatureParams.from_config(cfg)
    resample(np.zeros(8000, dtype=np.float32), 8000, params.sample_rate)
    log_mel(np.zeros((1, params.chunk_samples), dtype=np.float32), params)


def audioshard_build(input_dir: Path, out_dir: Path, cfg: Config, workers: int) -> int:
    """`build_shards` with progress off; returns the number of chunks written."""
    result = build_shards(input_dir, out_dir, cfg, workers=workers, force=True, progress=False)
    return sum(split["samples"] for split in result.manifest["splits"].values())


# ----------------------------------------------------------------------------------------------
# Timing and report


def _machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as stream:
            fields = [int(v) for v in stream.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_one(method: str, input_dir: Path, workers: int, sync: bool = False) -> dict[str, Any]:
    """Warm up, then time one build of `method` on every recording under `input_dir` (runs in a fresh process).
    With `sync`, say "ready" on stdout after the warm-up and wait for a line on stdin before timing.

    Returns:
        {"wall_s": seconds around the whole build, "cpu_s": CPU seconds it used (all its processes),
        "others_cores": cores other programs kept busy meanwhile on average (None off Linux),
        "chunks": chunks written}
    """
    cfg = load_config(overrides=[f"shards.workers={workers}"])
    with tempfile.TemporaryDirectory(prefix="bench_build_out_") as tmp:
        out_dir = Path(tmp) / "out"
        if method == "seed":
            recordings = list_recordings(input_dir, cfg.audio.extensions, None)
            seed_warmup()
        else:
            audioshard_warmup(cfg)
        if sync:
            print("ready", flush=True)
            sys.stdin.readline()
        busy0, cpu0, start = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        if method == "seed":
            chunks = seed_build(recordings, out_dir, workers)
        else:
            chunks = audioshard_build(input_dir, out_dir, cfg, workers)
        wall, cpu, busy1 = time.perf_counter() - start, _own_cpu_s() - cpu0, _machine_busy_s()
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    return {"wall_s": wall, "cpu_s": cpu, "others_cores": others, "chunks": chunks}


def time_in_subprocess(method: str, input_dir: Path, workers: int) -> dict[str, Any]:
    """`time_one` in a fresh Python process, so no run inherits another's caches, heap or compiled kernels."""
    return time_concurrent(method, input_dir, workers, copies=1)[0]


def time_concurrent(method: str, input_dir: Path, workers: int, copies: int) -> list[dict[str, Any]]:
    """`copies` fresh processes, each running `time_one` at the same time; their results.

    With workers=1 this is the machine's own ceiling for N-way parallel builds: N builds that share
    nothing (no pool, no main process, no IPC) contend only for the cores, caches and memory bandwidth."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--input", str(input_dir), "--workers", str(workers),
           "--child", method, "--sync"]
    env = {**SEED_THREADS, **os.environ} if method == "seed" else None  # a value set by hand wins
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(copies)]
    for proc in procs:  # all warmed up, then all start timing together
        proc.stdout.readline()
    for proc in procs:
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        except BrokenPipeError:  # it failed during its warm-up; its error is reported below
            pass
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{method} with {workers} workers failed:\n{err.strip()}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run_benchmark(input_dir: Path, workers_list: list[int], repeat: int, limit: int | None,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Time both methods for each worker count on the same files, each run in a fresh process.

    Repeats are interleaved (all configurations once, then again) so that a slow spell of the machine
    does not land on one configuration only; the fastest run of each is kept.

    Returns:
        The report as a JSON-ready dict (see `format_table` for its reading).
    """
    recordings = list_recordings(input_dir, load_config().audio.extensions, limit)
    if not recordings:
        raise SystemExit(f"{input_dir}: no audio files in class subfolders")
    audio_seconds = total_seconds(recordings)
    log(f"{len(recordings)} files, {audio_seconds:.1f} s of audio; each run in a fresh process, warmed up first")

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {str(w): [] for w in workers_list} for m in METHODS}
    independent: dict[str, list[float]] = {str(w): [] for w in workers_list if w > 1}
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        source_dir = input_dir if limit is None else link_subset(recordings, Path(tmp) / "input")
        for rep in range(repeat):
            for workers in workers_list:
                for method in METHODS:
                    run = time_in_subprocess(method, source_dir, workers)
                    runs[method][str(workers)].append(run)
                    others = "" if run["others_cores"] is None else f", other programs {run['others_cores']:.2f} cores"
                    log(f"run {rep + 1}/{repeat}  {LABELS[method]:<11} {workers} worker{'s' if workers > 1 else ''}: "
                        f"{run['wall_s']:.2f} s wall, {audio_seconds / run['wall_s']:.1f} audio s / s, "
                        f"{run['cpu_s']:.2f} CPU s, {run['chunks']} chunks{others}")
                if workers > 1:
                    # Reference: as many independent 1-worker builds at once (started together; the
                    # slowest one's wall time counts for all).
                    together = time_concurrent("audioshard", source_dir, 1, workers)
                    wall = max(r["wall_s"] for r in together)
                    independent[str(workers)].append(wall)
                    log(f"run {rep + 1}/{repeat}  {workers} independent 1-worker audioshard builds at once: "
                        f"{wall:.2f} s wall (slowest), {workers * audio_seconds / wall:.1f} audio s / s together")

    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in METHODS}
    for method in METHODS:
        for k, tries in runs[method].items():
            best = min(tries, key=lambda r: r["wall_s"])
            results[method][k] = {"wall_s": best["wall_s"], "audio_s_per_s": audio_seconds / best["wall_s"],
                                  "cpu_s": best["cpu_s"], "others_cores": best["others_cores"],
                                  "chunks": best["chunks"], "all_wall_s": [r["wall_s"] for r in tries]}
    keys = [str(w) for w in workers_list]
    ratio = {k: results["audioshard"][k]["audio_s_per_s"] / results["seed"][k]["audio_s_per_s"] for k in keys}
    report: dict[str, Any] = {
        "input": str(input_dir),
        "files": len(recordings),
        "audio_seconds": audio_seconds,
        "cores": os.cpu_count(),
        "repeat": repeat,
        "limit_per_class": limit,
        "results": results,
        "ratio_vs_seed": ratio,
    }
    base = keys[0]
    for k in keys[1:]:
        report[f"speedup_{base}_to_{k}"] = {
            m: results[m][k]["audio_s_per_s"] / results[m][base]["audio_s_per_s"] for m in METHODS}
    # The machine's ceiling: N independent builds together over one build alone (same 1-worker code).
    report["independent_builds"] = {
        k: {"wall_s": min(walls), "all_wall_s": walls,
            "speedup_vs_1": int(k) * audio_seconds / min(walls) / results["audioshard"]["1"]["audio_s_per_s"]}
        for k, walls in independent.items() if "1" in results["audioshard"]}
    # Paired per repetition: the runs of one repetition follow each other within seconds, so their
    # ratios resist the host's slow drift better than ratios of bests taken minutes apart.
    walls = {m: {k: [r["wall_s"] for r in runs[m][k]] for k in keys} for m in METHODS}

    def paired(slower: list[float], faster: list[float], scale: float = 1.0) -> dict[str, Any]:
        values = [scale * s / f for s, f in zip(slower, faster, strict=True)]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}

    report["paired"] = {
        "ratio_vs_seed": {k: paired(walls["seed"][k], walls["audioshard"][k]) for k in keys},
        **{f"speedup_{base}_to_{k}": {m: paired(walls[m][base], walls[m][k]) for m in METHODS} for k in keys[1:]},
        "independent_builds": {k: paired(walls["audioshard"]["1"], w, scale=int(k))
                               for k, w in independent.items() if "1" in walls["audioshard"]},
    }
    targets: dict[str, Any] = {}
    if "1" in ratio:
        targets["ratio_1_worker"] = {"target": TARGET_RATIO_1_WORKER, "value": ratio["1"],
                                     "met": ratio["1"] >= TARGET_RATIO_1_WORKER}
    if "speedup_1_to_2" in report:
        value = report["speedup_1_to_2"]["audioshard"]
        targets["audioshard_speedup_1_to_2"] = {"target": TARGET_SPEEDUP_1_TO_2, "value": value,
                                                "met": value >= TARGET_SPEEDUP_1_TO_2}
    report["targets"] = targets
    return report


def format_table(report: dict[str, Any], workers_list: list[int]) -> str:
    """The human-readable report: one line per (method, workers), then ratios, speed-ups and targets."""
    keys = [str(w) for w in workers_list]
    source = Path(report["input"]).name
    if report["limit_per_class"]:
        source += f", --limit {report['limit_per_class']}"
    best = f", fastest of {report['repeat']} runs" if report["repeat"] > 1 else ""
    lines = [f"build benchmark: {report['files']} files, {report['audio_seconds']:.1f} s of audio ({source}), "
             f"{report['cores']}-core machine{best}",
             f"{'method':<12} {'workers':<9} {'wall s':<8} {'audio s / wall s':<18} {'CPU s':<7} others (cores)"]
    for k in keys:
        for method in METHODS:
            r = report["results"][method][k]
            others = "?" if r["others_cores"] is None else f"{r['others_cores']:.2f}"
            lines.append(f"{LABELS[method]:<12} {k:<9} {r['wall_s']:<8.2f} {r['audio_s_per_s']:<18.1f} "
                         f"{r['cpu_s']:<7.2f} {others}")
    lines.append("ratio audioshard / seed:  "
                 + "   ".join(f"{k} worker{'s' if k != '1' else ''}: {report['ratio_vs_seed'][k]:.1f}x" for k in keys))
    for k in keys[1:]:
        speedup = report[f"speedup_{keys[0]}_to_{k}"]
        ceiling = report["independent_builds"].get(k)
        reference = (f"   ({k} independent 1-worker builds at once: {ceiling['speedup_vs_1']:.2f}x, this machine's "
                     "ceiling)") if ceiling else ""
        lines.append(f"speed-up {keys[0]} -> {k} workers:  audioshard {speedup['audioshard']:.2f}x   "
                     f"seed {speedup['seed']:.2f}x{reference}")
    if report["repeat"] > 1:
        pair = report["paired"]

        def spread(p: dict[str, Any]) -> str:
            return f"{p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f})"

        lines.append(f"paired per repetition, median (range) of {report['repeat']}:  audioshard / seed "
                     + "   ".join(f"{k}w {spread(pair['ratio_vs_seed'][k])}" for k in keys))
        for k in keys[1:]:
            ceiling, speedup = pair["independent_builds"].get(k), pair[f"speedup_{keys[0]}_to_{k}"]
            independent = f"   {k} independent builds {spread(ceiling)}" if ceiling else ""
            lines.append(f"    speed-up {keys[0]} -> {k}: audioshard {spread(speedup['audioshard'])}   seed "
                         f"{spread(speedup['seed'])}{independent}")
    names = {"ratio_1_worker": "audioshard / seed, 1 worker", "audioshard_speedup_1_to_2": "audioshard 1 -> 2 workers"}
    for name, t in report["targets"].items():
        lines.append(f"target {names[name]} >= {t['target']}x: {'met' if t['met'] else 'NOT met'} ({t['value']:.2f}x)")
    busiest = max((r["others_cores"] or 0.0) for m in METHODS for r in report["results"][m].values())
    if busiest > BUSY_CORES:
        lines.append(f"warning: other programs kept up to {busiest:.2f} cores busy during a reported run: the numbers "
                     "are noisy; rerun on a quiet machine, or with --repeat 3")
    lines.append("(each run in a fresh process; timed: the whole build incl. pool start-up; not timed: imports and a "
                 "warm-up on a tiny input (librosa lazy imports/numba JIT, torchaudio mel filters); 1 worker runs "
                 "in-process; N workers: the seed a fork pool of N, audioshard the caller + N-1 forked helpers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, print the table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder with one subfolder per class")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N files of each class")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)  # internal: one timed run
    parser.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)  # internal: wait for "go" on stdin
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(time_one(args.child, args.input, args.workers[0], args.sync)))
        return
    if args.repeat < 1 or any(w < 1 for w in args.workers) or (args.limit is not None and args.limit < 1):
        parser.error("--repeat, --workers and --limit must be >= 1")
    if not args.input.is_dir():
        parser.error(f"{args.input}: not a folder (give --input DIR with one subfolder per class)")
    workers_list = list(dict.fromkeys(args.workers))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(args.input, workers_list, args.repeat, args.limit, log)
    print(json.dumps(report, indent=2) if args.json else format_table(report, workers_list))


if __name__ == "__main__":
    main()
