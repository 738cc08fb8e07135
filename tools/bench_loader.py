"""Benchmark data loading: audioshard's stream against the original and the plain-webdataset ways.

What it measures, on the same chunks (the drone_car_speech build, tiled to >= 200,000 chunks of
(64, 63) float16 log-mel), batch size 256, with the same augmentation semantics everywhere
(normalise, Gaussian noise std 0.1, two SpecAugment time masks of up to 8 frames per sample):

    npz         the original system: one compressed `.npz` file per chunk, a map-style Dataset that
                loads, normalises and augments one chunk at a time, DataLoader(batch_size=256, shuffle)
    plain_wds   a plain webdataset pipeline, one chunk per tar member:
                WebDataset(urls).shuffle(1000).decode().to_tuple().map(augment).batched(256)
    audioshard  what `audioshard train` runs: 64 chunks per tar member, shuffle buffer of blocks,
                float16 batches from the workers, whole-batch normalise + augment in the consumer (the
                main process's CPU here; the GPU in a GPU run)
    audioshard_worker_aug  the library path `open_shards(...)`: the same, but normalise + augment
                run inside the loader worker
    raw         sequential reads of audioshard's shard files, nothing decoded: the I/O ceiling

Each (method, workers) runs in a fresh subprocess, so each gets its own peak RSS (main process +
the largest loader worker, from getrusage). Throughput is samples per second over at most
`--seconds` of steady-state iteration after the first batch (start-up excluded). It also measures
audioshard reading the same shards from a real HTTP server on 127.0.0.1 (vs local disk), and
audioshard's peak RSS on 10x fewer shards (does memory grow with the data set?).

Commands (from the repository root; the first run writes ~4 GB of test data to --work, later
runs reuse it):

    .venv/bin/python tools/bench_loader.py                     # table
    .venv/bin/python tools/bench_loader.py --json              # one JSON object on stdout
    .venv/bin/python tools/bench_loader.py --workers 1 --seconds 5

Each (method, workers) runs `--repeat` times (default 2), interleaved, and the best run is kept; HTTP
and local runs alternate `--http-repeat` times (default 2) the same way. A small shared machine
has bursts of outside load, and a single 15-s run can land in one.

How to read it: `ratios.N.vs_plain_wds` is audioshard's samples/s over plain webdataset's with N
loader workers (target >= 5), `vs_npz` over the original way (target >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
NOISE_STD, TIME_MASKS, TIME_MASK_WIDTH = 0.1, 2, 8
METHODS = ("npz", "plain_wds", "audioshard", "audioshard_worker_aug", "raw")


# --- data preparation (once, cached in --work) ----------------------------------------------------


def prepare(work: Path, source: Path, target: int) -> dict:
    """Build the real data once, then tile its chunks into the three layouts; returns a description."""
    import numpy as np
    import webdataset as wds

    from audioshard.build import build_shards
    from audioshard.config import load_config
    from audioshard.manifest import load_manifest, write_json_atomic, write_list_file
    from audioshard.stream import ShardStream
    from audioshard.writer import SplitWriter

    done = work / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    build_shards(source, base, load_config(), progress=False)
    manifest = load_manifest(base)
    chunks = [b for split in ("train", "val", "test") for b in ShardStream(manifest, split, 4096)]
    x = np.concatenate([b.x.numpy()[:, 0] for b in chunks])
    y = np.concatenate([b.y.numpy() for b in chunks])
    repeats = -(-target // len(y))
    total = repeats * len(y)
    print(f"tiling {len(y)} real chunks x {repeats} = {total} chunks", file=sys.stderr)

    def tiled(limit: int):
        for r in range(repeats):
            for i in range(len(y)):
                n = r * len(y) + i
                if n >= limit:
                    return
                yield n, x[i], int(y[i])

    for name, count in (("audioshard", total), ("audioshard_small", total // 10)):
        out = work / name
        out.mkdir(exist_ok=True)
        writer = SplitWriter(out, "train", manifest.block_size, 1024)
        for n, mel, label in tiled(count):
            writer.add(mel[None], label, n % 1000, np.array([0.0], np.float32))
        shards = writer.close()
        data = dict(manifest.data)
        labels = np.bincount([label for _, _, label in tiled(count)], minlength=len(manifest.classes))
        # 1000 stand-in recordings (the chunks' `source` indices), all under the first class
        sources = write_list_file(out, "train-recordings.jsonl",
                                  ({"path": str(i), "label": manifest.classes[0]} for i in range(1000)))
        data["splits"] = {"train": {
            "shards": shards, "samples": count, "audio_seconds": 0, "recordings_file": sources.to_dict(),
            "class_counts": {c: int(n) for c, n in zip(manifest.classes, labels, strict=True)},
            "recordings": {c: 1000 if i == 0 else 0 for i, c in enumerate(manifest.classes)}}}
        write_json_atomic(out / "manifest.json", data)

    plain = work / "plain"
    plain.mkdir(exist_ok=True)
    # mtime fixed as in audioshard's own shards: a float mtime would add a PAX header to every member.
    with wds.ShardWriter(str(plain / "plain-%06d.tar"), maxcount=1024, verbose=0, mtime=0) as sink:
        for n, mel, label in tiled(total):
            sink.write({"__key__": f"{n:09d}", "mel.npy": mel, "cls": label})

    npz = work / "npz"
    npz.mkdir(exist_ok=True)
    for n, mel, label in tiled(total):
        np.savez_compressed(npz / f"{n:09d}.npz", mel=mel, label=label)
    info = {"chunks": total, "real_chunks": len(y), "mean": manifest.mean, "std": manifest.std}
    done.write_text(json.dumps(info))
    return info


# --- the four pipelines (each runs in its own subprocess) -----------------------------------------


def augment_one(mel, generator, mean: float, std: float):
    """Per-sample augmentation, the way the original system and a plain pipeline do it (torch ops,
    which are faster than numpy's normal generator here)."""
    import torch

    x = (torch.from_numpy(mel).float() - mean) / std
    x += NOISE_STD * torch.randn(x.shape, generator=generator)
    frames = x.shape[-1]
    for _ in range(TIME_MASKS):
        width = int(torch.randint(0, TIME_MASK_WIDTH + 1, (1,), generator=generator))
        start = int(torch.randint(0, frames - width + 1, (1,), generator=generator))
        x[..., start:start + width] = 0.0
    return x


def loader_npz(work: Path, info: dict, workers: int):
    import numpy as np
    import torch

    files = sorted((work / "npz").glob("*.npz"))
    generator = torch.Generator().manual_seed(0)

    class NpzChunks(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, index):
            with np.load(files[index], allow_pickle=False) as data:
                mel, label = data["mel"], int(data["label"])
            return augment_one(mel, generator, info["mean"], info["std"])[None], label

    return torch.utils.data.DataLoader(NpzChunks(), batch_size=BATCH, shuffle=True, num_workers=workers)


def loader_plain_wds(work: Path, info: dict, workers: int):
    import torch
    import webdataset as wds

    urls = [str(p) for p in sorted((work / "plain").glob("*.tar"))]
    generator = torch.Generator().manual_seed(0)

    def aug(sample):
        mel, label = sample
        return augment_one(mel, generator, info["mean"], info["std"])[None], label

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node)
               .shuffle(1000).decode().to_tuple("mel.npy", "cls").map(aug).batched(BATCH))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def _augment_config():
    from audioshard.config import AugmentConfig

    return AugmentConfig(noise_std=NOISE_STD, time_masks=TIME_MASKS, time_mask_width=TIME_MASK_WIDTH, freq_masks=0)


def loader_audioshard_worker_aug(work: Path, info: dict, workers: int, source: str | None = None):
    """The library path (`open_shards`): normalise + augment each batch inside the loader worker."""
    from audioshard.stream import open_shards

    return open_shards(source or str(work / "audioshard"), "train", batch_size=BATCH, num_workers=workers,
                       augment_config=_augment_config())


def loader_audioshard_stream(work: Path, info: dict, workers: int, source: str | None = None,
                             persistent: bool = False):
    """Streaming alone (read, check, shuffle, batch float16), no normalisation or augmentation."""
    from audioshard.manifest import load_manifest
    from audioshard.stream import ShardStream, make_loader

    manifest = load_manifest(source or str(work / "audioshard"))
    return make_loader(ShardStream(manifest, "train", BATCH, shuffle=True), num_workers=workers,
                       persistent_workers=persistent and workers > 0)


def loader_audioshard(work: Path, info: dict, workers: int, source: str | None = None):
    """The `audioshard train` path: workers read and shuffle float16 batches; the consumer normalises
    and augments each whole batch where it trains (here the main process's CPU; a GPU in real runs)."""
    from audioshard.augment import BatchTransform
    from audioshard.manifest import load_manifest
    from audioshard.stream import ShardStream, make_loader

    manifest = load_manifest(source or str(work / "audioshard"))
    transform = BatchTransform.from_manifest(manifest, _augment_config())
    transform.reseed(0, 0)
    loader = make_loader(ShardStream(manifest, "train", BATCH, shuffle=True), num_workers=workers)
    return (transform(batch) for batch in loader)


def measure_raw(work: Path, workers: int, seconds: float) -> tuple[float, int]:
    """Sequential reads of the shard files, split over `workers` processes; chunks per second."""
    files = sorted((work / "audioshard").glob("*.tar"))
    info = json.loads((work / "prepared.json").read_text())
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", (
        "import sys\nfor f in sys.argv[1:]:\n    s=open(f,'rb',buffering=0)\n    while s.read(1<<22): pass\n")]
        + [str(f) for f in files[w::workers]]) for w in range(workers)]
    for proc in procs:
        proc.wait()
    elapsed = time.perf_counter() - started
    return info["chunks"] / elapsed, info["chunks"]


def run_one(work: Path, method: str, workers: int, seconds: float, source: str | None) -> dict:
    """Iterate one pipeline for up to `seconds` (after the first batch) and report samples/s and RSS."""
    import torch

    torch.set_num_threads(1)
    info = json.loads((work / "prepared.json").read_text())
    if method == "raw":
        rate, _ = measure_raw(work, max(1, workers), seconds)
    else:
        make = {"npz": loader_npz, "plain_wds": loader_plain_wds, "audioshard": loader_audioshard,
                "audioshard_worker_aug": loader_audioshard_worker_aug, "audioshard_stream": loader_audioshard_stream,
                "audioshard_small": loader_audioshard_stream, "audioshard_large": loader_audioshard_stream}[method]
        if method in ("audioshard_small", "audioshard_large"):  # long-lived workers, epochs until time is up
            name = "audioshard_small" if method == "audioshard_small" else "audioshard"
            loader = make(work, info, workers, str(work / name), persistent=True)
        else:
            loader = make(work, info, workers, source) if source else make(work, info, workers)
        # Whole epochs until `seconds` have passed (the small set is read several times), so every
        # configuration does the same amount of work per second of measurement.
        count, started, first = 0, None, True
        while started is None or time.perf_counter() - started <= seconds:
            for batch in loader:
                if first:  # start-up (worker launch, first shard) is not throughput
                    first, started = False, time.perf_counter()
                    continue
                count += len(batch[1])
                if time.perf_counter() - started > seconds:
                    break
            if method not in ("audioshard_small", "audioshard_large"):
                break
        rate = count / (time.perf_counter() - started)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"samples_per_s": rate, "peak_rss_mb": round(own + child, 1)}


def spawn(work: Path, method: str, workers: int, seconds: float, source: str | None = None) -> dict:
    command = [sys.executable, __file__, "--work", str(work), "--one", method, str(workers), "--seconds", str(seconds)]
    if source:
        command += ["--source", source]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ,
                                                                                      OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=ROOT.parent / "shared" / "data" / "drone_car_speech")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-bench-loader"))
    parser.add_argument("--chunks", type=int, default=200_000, help="tile the real chunks to at least this many")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=15.0, help="max seconds of iteration per measurement")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per (method, workers), interleaved; the best is reported (peak RSS: the largest)")
    parser.add_argument("--http-repeat", type=int, default=2,
                        help="alternating local/HTTP runs per pipeline; the best of each is compared")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="write the test data to --work and stop")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.work, args.one[0], int(args.one[1]), args.seconds, args.source)))
        return

    info = prepare(args.work, args.input, args.chunks)
    if args.prepare_only:
        return
    result: dict = {"chunks": info["chunks"], "batch_size": BATCH, "repeat": args.repeat, "samples_per_s": {},
                    "ratios": {}, "peak_rss_mb": {}, "cpu_cores": os.cpu_count()}
    # Every configuration runs --repeat times, interleaved (all once, then all again), and the best run
    # of each is kept: a burst of load from other programs then cannot decide a ratio on its own.
    for key in map(str, args.workers):
        result["samples_per_s"][key], result["peak_rss_mb"][key] = {}, {}
    for _ in range(args.repeat):
        for workers in args.workers:
            key = str(workers)
            for method in METHODS:
                one = spawn(args.work, method, workers, args.seconds)
                best = result["samples_per_s"][key].get(method, 0)
                result["samples_per_s"][key][method] = max(best, round(one["samples_per_s"]))
                result["peak_rss_mb"][key][method] = max(result["peak_rss_mb"][key].get(method, 0), one["peak_rss_mb"])
    for workers in args.workers:
        key = str(workers)
        rates = result["samples_per_s"][key]
        result["ratios"][key] = {"vs_plain_wds": round(rates["audioshard"] / rates["plain_wds"], 2),
                                 "vs_npz": round(rates["audioshard"] / rates["npz"], 2),
                                 "worker_aug_vs_plain_wds": round(rates["audioshard_worker_aug"] / rates["plain_wds"],
                                                                  2)}

    # Memory vs data set size, and HTTP vs local disk: audioshard with one loader worker (with more,
    # this 2-core machine's cores are all taken and the in-process HTTP server would compete for them).
    workers = min(args.workers)
    small = spawn(args.work, "audioshard_small", workers, args.seconds)
    large = spawn(args.work, "audioshard_large", workers, args.seconds)
    result["rss_scaling"] = {"chunks_small": info["chunks"] // 10, "chunks_large": info["chunks"],
                             "peak_rss_mb_small": small["peak_rss_mb"], "peak_rss_mb_large": large["peak_rss_mb"],
                             "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}
    from audioshard.serve import serving

    result["http"] = {"workers": workers, "repeat": args.http_repeat}
    for method in ("audioshard_stream", "audioshard"):  # streaming alone, then with consumer-side augmentation
        # Local and HTTP runs alternate and the best of each is kept, so a burst of load from other
        # programs on a small machine does not decide the ratio.
        local, remote = 0.0, 0.0
        for _ in range(args.http_repeat):
            local = max(local, spawn(args.work, method, workers, args.seconds)["samples_per_s"])
            with serving(args.work / "audioshard") as url:
                remote = max(remote, spawn(args.work, method, workers, args.seconds, source=url)["samples_per_s"])
        result["http"][method] = {"local": round(local), "http": round(remote), "ratio": round(remote / local, 3)}

    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"loader benchmark: {info['chunks']} chunks of (64, 63) float16, batch {BATCH}, {os.cpu_count()} cores")
    print(f"{'workers':<8} {'npz':>8} {'plain_wds':>10} {'audioshard':>11} {'(aug in worker)':>16} {'raw':>9}"
          "   vs plain_wds   vs npz")
    for key, rates in result["samples_per_s"].items():
        ratios = result["ratios"][key]
        print(f"{key:<8} {rates['npz']:>8} {rates['plain_wds']:>10} {rates['audioshard']:>11} "
              f"{rates['audioshard_worker_aug']:>16} {rates['raw']:>9}   {ratios['vs_plain_wds']:>11}x  "
              f"{ratios['vs_npz']:>6}x")
    print("peak RSS (MB):", json.dumps(result["peak_rss_mb"]))
    print("RSS, 10x more shards:", json.dumps(result["rss_scaling"]))
    print("HTTP (127.0.0.1) vs local disk:", json.dumps(result["http"]))


if __name__ == "__main__":
    main()
