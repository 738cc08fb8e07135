"""Does audioshard's stream keep a GPU busy? The seed CNN's training throughput, fed two ways.

    .venv/bin/python tools/bench_gpu.py --shards /tmp/audioshard-bench-loader/audioshard
    .venv/bin/python tools/bench_gpu.py --shards SHARDS --batch-sizes 256 1024 --workers 16 --json

For each batch size and precision (fp32, bf16 autocast) it measures training steps per second of
`seed_cnn` (forward, backward, Adam step) with
  staged   batches already on the GPU (random normalised data of the right shape): the ceiling;
  stream   batches from `audioshard.stream.ShardStream` with `--workers` loader workers (pinned
           memory, non_blocking copies), normalised and augmented on the GPU by BatchTransform,
           exactly as `audioshard train` does;
and prints samples/s for each and the ratio stream/staged (the issue's target: >= 0.9 at batch 256).
The shards can be the tiled set `tools/bench_loader.py --prepare-only` writes (200k chunks).
On a machine without a GPU it runs on the CPU, which only checks that the script works.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F

from audioshard.augment import BatchTransform
from audioshard.config import AugmentConfig
from audioshard.loader import make_loader
from audioshard.manifest import load_manifest
from audioshard.models import build_model, model_args
from audioshard.stream import ShardStream


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model, optimizer, batches, device: torch.device, bf16: bool, seconds: float,
                transform=None) -> float:
    """Samples per second over `seconds` of steady training (after 5 warm-up steps)."""
    count, started = 0, None
    for step, batch in enumerate(batches):
        if step == 5:
            sync(device)
            started = time.perf_counter()
        x, y = batch
        if transform is not None:  # stream: copy, then normalise + augment on the device
            x = transform.normalize(x.to(device, non_blocking=True))
            x = transform.augment(x, transform.generator, inplace=True)
            y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if started is not None:
            count += len(y)
            if time.perf_counter() - started > seconds:
                break
    sync(device)
    return count / (time.perf_counter() - started)


def epochs(loader):
    """(x, y) batches from the loader, epoch after epoch."""
    while True:
        yield from ((batch.x, batch.y) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a build folder (or URL) with a large train split")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = load_manifest(args.shards)
    shape = (1, *manifest.features.shape)
    results = []
    for batch_size in args.batch_sizes:
        for bf16 in ([False, True] if device.type == "cuda" else [False]):
            torch.manual_seed(0)
            model = build_model(model_args("seed_cnn", len(manifest.classes), 16, 0.0)).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            staged_x = torch.randn(batch_size, *shape, device=device)
            staged_y = torch.randint(0, len(manifest.classes), (batch_size,), device=device)
            staged = train_steps(model, optimizer, itertools.repeat((staged_x, staged_y)), device, bf16,
                                 args.seconds)

            transform = BatchTransform.from_manifest(manifest, AugmentConfig(noise_std=0.1, freq_masks=0))
            transform.reseed(0, 0)
            transform.generator = torch.Generator(device=device).manual_seed(0)
            loader = make_loader(ShardStream(manifest, "train", batch_size, shuffle=True), args.workers,
                                 pin_memory=device.type == "cuda")

            streamed = train_steps(model, optimizer, epochs(loader), device, bf16, args.seconds, transform)
            results.append({"batch_size": batch_size, "precision": "bf16" if bf16 else "fp32",
                            "staged_samples_per_s": round(staged), "stream_samples_per_s": round(streamed),
                            "ratio": round(streamed / staged, 3)})
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "workers": args.workers,
            "date": time.strftime("%Y-%m-%d"), "results": results}
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"seed_cnn training throughput on {info['device']}, {args.workers} loader workers")
    print(f"{'batch':>6} {'precision':>9} {'staged/s':>10} {'stream/s':>10} {'ratio':>6}")
    for r in results:
        print(f"{r['batch_size']:>6} {r['precision']:>9} {r['staged_samples_per_s']:>10} "
              f"{r['stream_samples_per_s']:>10} {r['ratio']:>6}")


if __name__ == "__main__":
    main()
