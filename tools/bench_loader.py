"""Benchmark data loading: audioshard against the strongest peer loaders, same data, same run.

What it measures, on the same chunks (the drone_car_speech build, tiled to >= 200,000 chunks of
(64, 63) float16 log-mel), batch size 256, with the same augmentation semantics everywhere
(normalise with the train mean/std, per-example Gaussian noise std 0.1, two time masks of up to 8
frames per example, no frequency masks):

    npz         the original system: one compressed `.npz` file per chunk, a map-style Dataset that
                loads, normalises and augments one chunk at a time (`augment_one`), DataLoader(batch_size=256,
                shuffle=True)
    plain_wds   a plain webdataset pipeline, one chunk per tar member, per-sample augmentation:
                WebDataset(urls).shuffle(1000).decode().to_tuple().map(augment_one).batched(256)
    lance       pylance: the chunks as one Lance dataset (x: fixed-size list of 4,032 float16, y: int64).
                Read the way its PyTorch page's "safe dataloader" does (`lance.torch.data.SafeLanceDataset`
                + `get_safe_loader`): a map-style Dataset whose `__getitems__` fetches a whole batch with one
                `dataset.take(indices)`, DataLoader(batch_size=256, shuffle=True) = a full row-level shuffle,
                workers started with "spawn" (Lance is not fork-safe). Where SafeLanceDataset converts
                the Arrow batch with `to_pylist()` (a Python list per value), this one takes the fixed-size
                list's values buffer zero-copy into one (B, 1, 64, 63) tensor: the fastest honest reading.
    litdata     litData: `optimize()` into its chunked format (64 MB chunks, no compression), read with
                StreamingDataset(shuffle=True) + StreamingDataLoader(batch_size=256): chunk order shuffled,
                samples shuffled within chunks, default collate.
    mosaic      MosaicML streaming: `MDSWriter` (columns x "ndarray:float16:64,63", y "int64", no
                compression, default 64 MB shards), read with StreamingDataset(local=..., shuffle=True,
                batch_size=256) (its default shuffle, py1e) + a torch DataLoader(batch_size=256).
    audioshard  what `audioshard train` runs: 64 chunks per tar member, shuffle buffer of blocks,
                float16 batches from the workers, whole-batch normalise + augment in the consumer (the
                main process's CPU here; the GPU in a GPU run)
    audioshard_worker_aug  the library path `open_shards(...)`: the same, but normalise + augment
                run inside the loader worker
    audioshard_stream  streaming alone: float16 batches, no normalisation, no augmentation
    raw         sequential reads of audioshard's shard files, nothing decoded: the I/O ceiling

The three peers (lance, litdata, mosaic) read float16 batches in their workers and are normalised and
augmented in the consumer with audioshard's own whole-batch `BatchTransform`, exactly like the
`audioshard` row: the augmentation costs the same in all of them, and what differs is the loading.
The benchmark's AugmentConfig sets the library's newer defaults (freq_warp, time_stretch,
background_prob, gain_db, eq_db, time_shift, freq_masks) to 0, so every loader does the same work as
`augment_one`. With 0 workers everything runs in one process.

Each (method, workers) runs in a fresh subprocess. Throughput is samples per second over at most
`--seconds` of steady-state iteration after the first batch (start-up excluded). Memory: a thread
samples the whole process tree (the measuring process, its loader workers and their helpers) every
0.2 s and keeps the peak of the summed PSS (from /proc/PID/smaps_rollup: shared pages are split
between the processes that map them, so the sum is not inflated the way an RSS sum is) and of the
summed RSS. It also measures audioshard reading the same shards from a real HTTP server on 127.0.0.1
(vs local disk), and audioshard's peak memory on 10x fewer shards (does memory grow with the data set?).

The peers are the `bench` extra (`pip install -e '.[bench]'`); a peer that is not installed is
skipped with a line saying so. mosaicml-streaming 0.13 pins numpy<2.2, transformers<5 and xxhash<4,
which a current environment (the `test` extra's datasets) does not satisfy; it runs with newer ones:
`pip install --no-deps mosaicml-streaming && pip install transformers zstd python-snappy brotli catalogue`.

Commands (from the repository root; the first run writes the test data to --work, ~1.6 GB per
layout for 200,000 chunks (the npz layout less), later runs reuse it; a layout added later is
written on the first run that needs it):

    .venv/bin/python tools/bench_loader.py                     # table
    .venv/bin/python tools/bench_loader.py --json              # one JSON object on stdout
    .venv/bin/python tools/bench_loader.py --workers 0 1 2 --seconds 15 --repeat 3
    .venv/bin/python tools/bench_loader.py --target 20000 --seconds 3 --repeat 1 --work /tmp/bench_small --check
    .venv/bin/python tools/bench_loader.py --methods lance audioshard --workers 1

`--check` reads one whole epoch with each method first and fails unless every batch has the
expected shape and dtype and the epoch holds every chunk once (count and per-class counts).

Each (method, workers) runs `--repeat` times (default 2), interleaved, and the best run is kept; HTTP
and local runs alternate `--http-repeat` times (default 2) the same way. A small shared machine
has bursts of outside load, and a single 15-s run can land in one.

How to read it: `ratios.N.train_path_vs_best_peer` is audioshard's samples/s (train path) over the
fastest peer's (`best_peer`: npz, plain_wds, lance, litdata or mosaic) with N loader workers,
`worker_aug_vs_best_peer` the same for the library path; `vs_plain_wds` and `vs_npz` as before
(targets >= 5 and >= 10).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
NOISE_STD, TIME_MASKS, TIME_MASK_WIDTH = 0.1, 2, 8
PEERS = ("npz", "plain_wds", "lance", "litdata", "mosaic")
METHODS = (*PEERS, "audioshard", "audioshard_worker_aug", "audioshard_stream", "raw")
# the peers outside the core install (the `bench` extra): method -> (import name, pip name)
OPTIONAL = {"lance": ("lance", "pylance"), "litdata": ("litdata", "litdata"),
            "mosaic": ("streaming", "mosaicml-streaming")}


def missing(method: str) -> str | None:
    """The pip package a method needs and lacks, or None."""
    module, package = OPTIONAL.get(method, (None, None))
    return package if module and importlib.util.find_spec(module) is None else None


# --- data preparation (once, cached in --work) ----------------------------------------------------


def real_chunks(work: Path):
    """The real build's chunks: x (N, 64, 63) float16 dB, y (N,) int64, and the manifest."""
    import numpy as np

    from audioshard.manifest import load_manifest
    from audioshard.stream import ShardStream

    manifest = load_manifest(work / "base")
    chunks = [b for split in ("train", "val", "test") for b in ShardStream(manifest, split, 4096)]
    x = np.concatenate([b.x.numpy()[:, 0] for b in chunks])
    y = np.concatenate([b.y.numpy() for b in chunks]).astype(np.int64)
    return x, y, manifest


def tiled(x, y, limit: int):
    """Chunk n of the benchmark set is real chunk n % len(y): (n, mel, label) for n < limit."""
    for n in range(limit):
        yield n, x[n % len(y)], int(y[n % len(y)])


def prepare(work: Path, source: Path, target: int) -> dict:
    """Build the real data once, then tile its chunks into the core layouts; returns a description."""
    import numpy as np
    import webdataset as wds

    from audioshard.build import build_shards
    from audioshard.config import load_config
    from audioshard.manifest import write_json_atomic, write_list_file
    from audioshard.writer import SplitWriter

    done = work / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    build_shards(source, work / "base", load_config(), progress=False)
    x, y, manifest = real_chunks(work)
    total = -(-target // len(y)) * len(y)
    print(f"tiling {len(y)} real chunks x {total // len(y)} = {total} chunks", file=sys.stderr)

    for name, count in (("audioshard", total), ("audioshard_small", total // 10)):
        out = work / name
        out.mkdir(exist_ok=True)
        writer = SplitWriter(out, "train", manifest.block_size, 1024)
        for n, mel, label in tiled(x, y, count):
            writer.add(mel[None], label, n % 1000, np.array([0.0], np.float32))
        shards = writer.close()
        data = dict(manifest.data)
        labels = np.bincount([label for _, _, label in tiled(x, y, count)], minlength=len(manifest.classes))
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
        for n, mel, label in tiled(x, y, total):
            sink.write({"__key__": f"{n:09d}", "mel.npy": mel, "cls": label})

    npz = work / "npz"
    npz.mkdir(exist_ok=True)
    for n, mel, label in tiled(x, y, total):
        np.savez_compressed(npz / f"{n:09d}.npz", mel=mel, label=label)
    info = {"chunks": total, "real_chunks": len(y), "mean": manifest.mean, "std": manifest.std}
    done.write_text(json.dumps(info))
    return info


def prepare_peer(work: Path, method: str, info: dict) -> None:
    """Write the tiled chunks in a peer's own format (once: `<work>/<method>.done` marks it complete)."""
    import shutil

    done = work / f"{method}.done"
    if done.exists() or method not in OPTIONAL or missing(method):
        return
    out = work / method
    shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier attempt
    x, y, _ = real_chunks(work)
    total = info["chunks"]
    started = time.perf_counter()
    {"lance": _write_lance, "litdata": _write_litdata, "mosaic": _write_mosaic}[method](out, x, y, total)
    print(f"wrote {total} chunks as {method} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    done.touch()


def _write_lance(out: Path, x, y, total: int) -> None:
    import lance
    import numpy as np
    import pyarrow as pa

    schema = pa.schema([("x", pa.list_(pa.float16(), x[0].size)), ("y", pa.int64())])

    def batches():
        for start in range(0, total, 8192):
            index = np.arange(start, min(total, start + 8192)) % len(y)
            values = pa.array(x[index].reshape(-1))
            yield pa.RecordBatch.from_arrays(
                [pa.FixedSizeListArray.from_arrays(values, x[0].size), pa.array(y[index])], schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(out), schema=schema)


def _litdata_samples(start: int, x, y, total: int):
    for n in range(start, min(total, start + 4096)):
        yield {"x": x[n % len(y)], "y": int(y[n % len(y)])}


def _write_litdata(out: Path, x, y, total: int) -> None:
    from functools import partial

    import litdata

    litdata.optimize(fn=partial(_litdata_samples, x=x, y=y, total=total), inputs=list(range(0, total, 4096)),
                     output_dir=str(out), chunk_bytes="64MB", num_workers=min(4, os.cpu_count() or 1),
                     verbose=False)


def _write_mosaic(out: Path, x, y, total: int) -> None:
    from streaming import MDSWriter

    shape = ",".join(map(str, x[0].shape))
    with MDSWriter(out=str(out), columns={"x": f"ndarray:float16:{shape}", "y": "int64"}, compression=None,
                   progress_bar=False) as sink:
        for _, mel, label in tiled(x, y, total):
            sink.write({"x": mel, "y": label})


# --- the pipelines (each runs in its own subprocess) ----------------------------------------------


def augment_one(mel, generator, mean: float, std: float):
    """Per-sample augmentation, the way the original system and a plain pipeline do it (torch ops,
    which are faster than numpy's normal generator here)."""
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
    import webdataset as wds

    urls = [str(p) for p in sorted((work / "plain").glob("*.tar"))]
    generator = torch.Generator().manual_seed(0)

    def aug(sample):
        mel, label = sample
        return augment_one(mel, generator, info["mean"], info["std"])[None], label

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node)
               .shuffle(1000).decode().to_tuple("mel.npy", "cls").map(aug).batched(BATCH))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


def consumer_augment(work: Path, loader):
    """(x (B, 1, 64, 63) float16 dB, y (B,)) batches -> normalised, augmented float32, in this process,
    by the same whole-batch BatchTransform as the `audioshard` row (for the peers)."""
    from audioshard.augment import BatchTransform
    from audioshard.manifest import load_manifest
    from audioshard.stream import Batch

    transform = BatchTransform.from_manifest(load_manifest(work / "audioshard"), _augment_config())
    transform.reseed(0, 0)
    for x, y in loader:
        yield transform(Batch(x, y, y, y)).x, y


class LanceTake(torch.utils.data.Dataset):
    """A Lance dataset read a batch at a time: `__getitems__` (which the DataLoader calls with a whole
    batch of indices) is one `take`, the way lance.torch.data.SafeLanceDataset reads, opened lazily in
    each worker (Lance is not fork-safe); the float16 values come zero-copy out of Arrow."""

    def __init__(self, uri: str):
        import lance

        self.uri, self.rows, self.dataset = uri, lance.dataset(uri).count_rows(), None

    def __len__(self) -> int:
        return self.rows

    def __getitems__(self, indices: list[int]):
        import lance

        if self.dataset is None:
            self.dataset = lance.dataset(self.uri)
        table = self.dataset.take(sorted(indices), columns=["x", "y"])  # sorted: ordered reads, same set
        x = table.column("x").combine_chunks()
        with warnings.catch_warnings():  # read-only Arrow memory; nothing writes to it in place
            warnings.simplefilter("ignore", UserWarning)
            return (torch.from_numpy(x.values.to_numpy(zero_copy_only=True)).view(len(x), 1, 64, -1),
                    torch.from_numpy(table.column("y").to_numpy()))


def _as_is(batch):
    return batch


def loader_lance(work: Path, info: dict, workers: int):
    kwargs = {"multiprocessing_context": "spawn", "persistent_workers": True} if workers else {}
    loader = torch.utils.data.DataLoader(LanceTake(str(work / "lance")), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, collate_fn=_as_is, **kwargs)
    return consumer_augment(work, loader)


def loader_litdata(work: Path, info: dict, workers: int):
    import litdata

    dataset = litdata.StreamingDataset(str(work / "litdata"), shuffle=True)
    loader = litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers)
    return consumer_augment(work, ((b["x"][:, None], b["y"]) for b in loader))


def loader_mosaic(work: Path, info: dict, workers: int):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # an earlier run's leftovers would stop this one
    dataset = StreamingDataset(local=str(work / "mosaic"), shuffle=True, batch_size=BATCH)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    return consumer_augment(work, ((b["x"][:, None], b["y"]) for b in loader))


def _augment_config():
    """What `augment_one` does and nothing more: the library's newer default augmentations (frequency
    warp and masks, time stretch and shift, background noise, gain, equaliser) are switched off here."""
    from audioshard.config import AugmentConfig

    return AugmentConfig(noise_std=NOISE_STD, time_masks=TIME_MASKS, time_mask_width=TIME_MASK_WIDTH, freq_masks=0,
                         freq_warp=0.0, time_stretch=0.0, background_prob=0.0, gain_db=0.0, eq_db=0.0,
                         time_shift=0.0)


def loader_audioshard_worker_aug(work: Path, info: dict, workers: int, source: str | None = None):
    """The library path (`open_shards`): normalise + augment each batch inside the loader worker."""
    from audioshard.loader import open_shards

    return open_shards(source or str(work / "audioshard"), "train", batch_size=BATCH, num_workers=workers,
                       augment_config=_augment_config())


def loader_audioshard_stream(work: Path, info: dict, workers: int, source: str | None = None,
                             persistent: bool = False):
    """Streaming alone (read, check, shuffle, batch float16), no normalisation or augmentation."""
    from audioshard.loader import make_loader
    from audioshard.manifest import load_manifest
    from audioshard.stream import ShardStream

    manifest = load_manifest(source or str(work / "audioshard"))
    return make_loader(ShardStream(manifest, "train", BATCH, shuffle=True), num_workers=workers,
                       persistent_workers=persistent and workers > 0)


def loader_audioshard(work: Path, info: dict, workers: int, source: str | None = None):
    """The `audioshard train` path: workers read and shuffle float16 batches; the consumer normalises
    and augments each whole batch where it trains (here the main process's CPU; a GPU in real runs)."""
    from audioshard.augment import BatchTransform
    from audioshard.loader import make_loader
    from audioshard.manifest import load_manifest
    from audioshard.stream import ShardStream

    manifest = load_manifest(source or str(work / "audioshard"))
    transform = BatchTransform.from_manifest(manifest, _augment_config())
    transform.reseed(0, 0)
    loader = make_loader(ShardStream(manifest, "train", BATCH, shuffle=True), num_workers=workers)
    return (transform(batch) for batch in loader)


LOADERS = {"npz": loader_npz, "plain_wds": loader_plain_wds, "lance": loader_lance, "litdata": loader_litdata,
           "mosaic": loader_mosaic, "audioshard": loader_audioshard,
           "audioshard_worker_aug": loader_audioshard_worker_aug, "audioshard_stream": loader_audioshard_stream}


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


# --- memory of the whole process tree -------------------------------------------------------------


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(PSS, RSS) in MB summed over `root` and all its descendants (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    pss = rss = 0.0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss:", "Rss:")):
                        kb = int(line.split()[1]) / 1024
                        pss, rss = (pss + kb, rss) if line.startswith("Pss:") else (pss, rss + kb)
        except (OSError, ValueError):  # gone between the listing and the read
            continue
    return pss, rss


class PeakMemory(threading.Thread):
    """Samples tree_memory_mb(this process) every `interval` s until stopped; keeps the peaks."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.pss, self.rss = interval, 0.0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            pss, rss = tree_memory_mb(os.getpid())
            self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)
            if self.done.wait(self.interval):
                return

    def stop(self) -> tuple[float, float]:
        self.done.set()
        self.join()
        return round(self.pss, 1), round(self.rss, 1)


# --- one measurement (in a fresh subprocess) ------------------------------------------------------


def make(work: Path, info: dict, method: str, workers: int, source: str | None = None):
    if method in ("audioshard_small", "audioshard_large"):  # long-lived workers, epochs until time is up
        name = "audioshard_small" if method == "audioshard_small" else "audioshard"
        return loader_audioshard_stream(work, info, workers, str(work / name), persistent=True)
    return LOADERS[method](work, info, workers, source) if source else LOADERS[method](work, info, workers)


def run_one(work: Path, method: str, workers: int, seconds: float, source: str | None) -> dict:
    """Iterate one pipeline for up to `seconds` (after the first batch); samples/s and peak memory."""
    torch.set_num_threads(1)
    info = json.loads((work / "prepared.json").read_text())
    memory = PeakMemory()
    memory.start()
    if method == "raw":
        rate, _ = measure_raw(work, max(1, workers), seconds)
    else:
        loader = make(work, info, method, workers, source)
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
        del loader  # workers end here, inside the measurement
    pss, rss = memory.stop()
    return {"samples_per_s": rate, "peak_pss_mb": pss, "peak_rss_mb": rss}


def check_one(work: Path, method: str, workers: int) -> dict:
    """One whole epoch: batch shapes and dtypes seen, samples, and per-class counts against the data's."""
    info = json.loads((work / "prepared.json").read_text())
    counts = json.loads((work / "audioshard" / "manifest.json").read_text())["splits"]["train"]["class_counts"]
    expected = list(counts.values())
    seen = torch.zeros(len(expected), dtype=torch.int64)
    shapes: dict[str, int] = {}
    for batch in make(work, info, method, workers):
        x, y = batch[0], torch.as_tensor(batch[1])
        key = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} y {str(y.dtype).removeprefix('torch.')}"
        shapes[key] = shapes.get(key, 0) + 1
        seen += torch.bincount(y.long(), minlength=len(expected))
    dtype = "float16" if method == "audioshard_stream" else "float32"
    full = f"({BATCH}, 1, 64, 63) {dtype}"
    ok = (int(seen.sum()) == info["chunks"] and seen.tolist() == expected
          and all(k.startswith(full) for k in shapes if shapes[k] > 1 or len(shapes) == 1)
          and sum(not k.startswith(full) for k in shapes) <= 1)  # at most the last batch is smaller
    return {"ok": ok, "samples": int(seen.sum()), "chunks": info["chunks"], "class_counts": seen.tolist(),
            "expected_class_counts": expected, "batches": shapes}


def spawn(work: Path, method: str, workers: int, seconds: float, source: str | None = None,
          check: bool = False) -> dict:
    command = [sys.executable, __file__, "--work", str(work), "--one", method, str(workers), "--seconds", str(seconds)]
    if source:
        command += ["--source", source]
    if check:
        command += ["--check"]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{method} with {workers} workers failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(rates: dict) -> dict:
    """audioshard (both paths) over the fastest peer measured, and over plain_wds and npz."""
    peers = {m: rates[m] for m in PEERS if rates.get(m)}
    best = max(peers, key=peers.get) if peers else None
    out: dict = {"best_peer": best}
    for name, method in (("train_path", "audioshard"), ("worker_aug", "audioshard_worker_aug")):
        if best and rates.get(method):
            out[f"{name}_vs_best_peer"] = round(rates[method] / peers[best], 2)
    for peer in ("plain_wds", "npz"):
        if rates.get("audioshard") and rates.get(peer):
            out[f"vs_{peer}"] = round(rates["audioshard"] / rates[peer], 2)
    return out


def measure_all(args, methods: list[str], result: dict) -> None:
    """Every (method, workers) --repeat times, interleaved (all once, then all again); the best run of each
    is kept: a burst of load from other programs then cannot decide a ratio on its own."""
    for key in map(str, args.workers):
        result["samples_per_s"][key], result["peak_pss_mb"][key], result["peak_rss_mb"][key] = {}, {}, {}
    for _ in range(args.repeat):
        for workers in args.workers:
            key = str(workers)
            for method in methods:
                one = spawn(args.work, method, workers, args.seconds)
                best = result["samples_per_s"][key].get(method, 0)
                result["samples_per_s"][key][method] = max(best, round(one["samples_per_s"]))
                for field in ("peak_pss_mb", "peak_rss_mb"):
                    result[field][key][method] = max(result[field][key].get(method, 0), one[field])
    for key, rates in result["samples_per_s"].items():
        result["ratios"][key] = ratios(rates)


def measure_audioshard_extras(args, info: dict, result: dict) -> None:
    """Memory vs data set size, and HTTP vs local disk: audioshard with one loader worker (with more,
    a 2-core machine's cores are all taken and the in-process HTTP server would compete for them)."""
    workers = max(1, min(args.workers))
    if not args.no_scaling:
        small = spawn(args.work, "audioshard_small", workers, args.seconds)
        large = spawn(args.work, "audioshard_large", workers, args.seconds)
        result["rss_scaling"] = {"chunks_small": info["chunks"] // 10, "chunks_large": info["chunks"],
                                 "peak_pss_mb_small": small["peak_pss_mb"], "peak_pss_mb_large": large["peak_pss_mb"],
                                 "ratio": round(large["peak_pss_mb"] / small["peak_pss_mb"], 3)}
    if args.http_repeat:
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


def print_table(result: dict, methods: list[str]) -> None:
    print(f"loader benchmark: {result['chunks']} chunks of (64, 63) float16, batch {BATCH}, "
          f"{result['cpu_cores']} cores; samples/s (best of {result['repeat']}), peak PSS MB of the process tree")
    short = {"audioshard_worker_aug": "as_worker_aug", "audioshard_stream": "as_stream"}
    print(f"{'workers':<8}" + "".join(f"{short.get(m, m):>15}" for m in methods)
          + "   best peer   train/peer   worker_aug/peer")
    for key, rates in result["samples_per_s"].items():
        r = result["ratios"][key]
        train, worker = (f"{r[k]}x" if k in r else "-" for k in ("train_path_vs_best_peer", "worker_aug_vs_best_peer"))
        print(f"{key:<8}" + "".join(f"{rates.get(m, '-'):>15}" for m in methods)
              + f"   {r['best_peer'] or '-':>9}   {train:>10}   {worker:>15}")
        print(f"{'  PSS MB':<8}" + "".join(f"{result['peak_pss_mb'][key].get(m, '-'):>15}" for m in methods))
    print("ratios:", json.dumps(result["ratios"]))
    for method, package in result["skipped"].items():
        print(f"skipped {method}: {package} is not installed (pip install -e '.[bench]')")
    if "rss_scaling" in result:
        print("memory, 10x more shards:", json.dumps(result["rss_scaling"]))
    if "http" in result:
        print("HTTP (127.0.0.1) vs local disk:", json.dumps(result["http"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=ROOT.parent / "shared" / "data" / "drone_car_speech")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-bench-loader"))
    parser.add_argument("--target", "--chunks", dest="chunks", type=int, default=200_000,
                        help="tile the real chunks to at least this many")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers (0: one process)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seconds", type=float, default=15.0, help="max seconds of iteration per measurement")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per (method, workers), interleaved; the best is reported (peak memory: the largest)")
    parser.add_argument("--http-repeat", type=int, default=2,
                        help="alternating local/HTTP runs per pipeline; the best of each is compared (0: skip)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the memory-vs-data-set-size measurement")
    parser.add_argument("--check", action="store_true",
                        help="first read one epoch with each method (lowest --workers) and check shapes and counts")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="write the test data to --work and stop")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, workers = args.one[0], int(args.one[1])
        one = (check_one(args.work, method, workers) if args.check
               else run_one(args.work, method, workers, args.seconds, args.source))
        print(json.dumps(one))
        return

    info = prepare(args.work, args.input, args.chunks)
    skipped = {m: missing(m) for m in args.methods if missing(m)}
    methods = [m for m in args.methods if m not in skipped]
    for method, package in skipped.items():
        print(f"skipping {method}: {package} is not installed (pip install -e '.[bench]')", file=sys.stderr)
    for method in methods:
        prepare_peer(args.work, method, info)
    if args.prepare_only:
        return
    result: dict = {"chunks": info["chunks"], "batch_size": BATCH, "repeat": args.repeat, "samples_per_s": {},
                    "ratios": {}, "peak_pss_mb": {}, "peak_rss_mb": {}, "cpu_cores": os.cpu_count(),
                    "skipped": skipped}
    if args.check:
        result["check"] = {m: spawn(args.work, m, min(args.workers), args.seconds, check=True)
                           for m in methods if m != "raw"}
        for method, one in result["check"].items():
            print(f"check {method}: {'ok' if one['ok'] else 'FAILED'} {json.dumps(one)}", file=sys.stderr)
    measure_all(args, methods, result)
    measure_audioshard_extras(args, info, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result, methods)
    if args.check and not all(one["ok"] for one in result["check"].values()):
        raise SystemExit("check failed: " + ", ".join(m for m, one in result["check"].items() if not one["ok"]))


if __name__ == "__main__":
    main()
