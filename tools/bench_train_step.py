"""Benchmark one training step on this machine's CPU: float32 against bfloat16 autocast, in the
default (contiguous) and the channels-last layout, side by side in one process.

What it measures: the default model (`cnn6`, width 64, or `--model/--width`), batches of random
(1, 64, 63) inputs (the default features of a 2-s chunk), 50 classes, AdamW; forward, cross-entropy,
backward and optimizer step, as `audioshard train` runs them. Each of the four variants is warmed up
(`--warmup` steps: oneDNN builds its kernels), then timed over `--steps` steps; variants take turns
`--repeat` times and the fastest round of each is kept. What `train.precision = "auto"` would choose
here is printed with the CPU's bf16 capabilities.

`--models NAME:WIDTH ...` compares networks instead: each in the arithmetic and layout `audioshard train`
would use on this CPU (channels-last; bfloat16 only where "auto" picks it), taking turns the same way,
with each one's time as a multiple of the first's.

    .venv/bin/python tools/bench_train_step.py
    .venv/bin/python tools/bench_train_step.py --models cnn6:64 cnn6:32 sepcnn:64 sepcnn:32 cnn10:32

`--after-build` times the same step in three glibc malloc states: fresh (glibc's dynamic
mmap threshold), after an in-process build (`audioshard.parallel.keeping_freed_memory`: what a recipe or
notebook that builds and then trains gets), and with the thresholds at glibc's initial 128 kB (what that
build left behind before 2026-12-07). Each state is timed in its own fresh interpreter; the states take turns.

    .venv/bin/python tools/bench_train_step.py --after-build --width 32
    .venv/bin/python tools/bench_train_step.py --json
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python tools/bench_train_step.py   # as a CPU without AMX
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python tools/bench_train_step.py               # as an AVX2 CPU

(`ONEDNN_MAX_CPU_ISA` caps the instructions oneDNN uses, so one machine shows what older CPUs get.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from audioshard.models import build_model, model_args
from audioshard.train import uses_bf16

VARIANTS = [("float32", False, False), ("float32, channels-last", False, True),
            ("bfloat16 autocast", True, False), ("bfloat16 autocast, channels-last", True, True)]


def time_steps(bf16: bool, channels_last: bool, args: argparse.Namespace, model_name: str = "",
               width: int = 0) -> float:
    """Seconds per training step of a fresh model (after the warm-up): `model_name` at `width`, or --model/--width."""
    torch.manual_seed(0)
    model = build_model(model_args(model_name or args.model, 50, width or args.width, 0.2)).train()
    x, y = torch.randn(args.batch, 1, 64, 63), torch.randint(0, 50, (args.batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - started) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn6")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", nargs="+", metavar="NAME:WIDTH",
                        help="compare these networks (as train runs them here) instead of the four layouts")
    parser.add_argument("--after-build", action="store_true",
                        help="time the step fresh, after an in-process build, and at glibc's initial thresholds")
    parser.add_argument("--malloc-state", choices=list(MALLOC_STATES), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    if args.models:
        compare_models(args)
        return
    if args.after_build:
        compare_malloc_states(args)
        return
    if args.malloc_state:  # one state's timing, for compare_malloc_states
        enter_malloc_state(args.malloc_state)
        print(time_steps(uses_bf16("auto", torch.device("cpu")), True, args))
        return
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    best = {name: float("inf") for name, _, _ in VARIANTS}
    for _ in range(args.repeat):  # the variants take turns: a slow moment of the machine hits all of them
        for name, bf16, layout in VARIANTS:
            best[name] = min(best[name], time_steps(bf16, layout, args))
    result = {
        "model": f"{args.model} width {args.width}", "batch": args.batch, "threads": torch.get_num_threads(),
        "cpu": {k: capabilities.get(k) for k in ("cpu_name", "amx_bf16", "avx512_bf16", "avx512_f", "avx2")},
        "auto_uses_bf16": uses_bf16("auto", torch.device("cpu")),
        "ms_per_step": {name: round(1000 * s, 1) for name, s in best.items()},
        "samples_per_s": {name: round(args.batch / s) for name, s in best.items()},
        "vs_float32": {name: round(best["float32"] / s, 2) for name, s in best.items()},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['model']}, batch {args.batch}, {result['threads']} threads; CPU {result['cpu']}")
    print(f"train.precision = \"auto\" would use bfloat16 here: {result['auto_uses_bf16']}")
    for name in best:
        print(f"  {name:<34} {result['ms_per_step'][name]:>8.1f} ms/step  {result['samples_per_s'][name]:>6} samples/s"
              f"  {result['vs_float32'][name]:.2f}x float32")


def compare_models(args: argparse.Namespace) -> None:
    """Each of --models in train's own arithmetic and layout on this CPU, in turns; times relative to the first."""
    bf16 = uses_bf16("auto", torch.device("cpu"))
    models = {spec: (spec.split(":")[0], int(spec.split(":")[1])) for spec in args.models}
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.repeat):
        for spec, (name, width) in models.items():
            best[spec] = min(best[spec], time_steps(bf16, True, args, name, width))
    sizes = {spec: sum(p.numel() for p in build_model(model_args(name, 50, width, 0.2)).parameters())
             for spec, (name, width) in models.items()}
    result = {spec: {"ms_per_step": round(1000 * s, 1), "vs_first": round(s / best[args.models[0]], 2),
                     "parameters_m": round(sizes[spec] / 1e6, 2)} for spec, s in best.items()}
    if args.json:
        print(json.dumps({"bfloat16": bf16, "batch": args.batch, "threads": torch.get_num_threads(),
                          "models": result}, indent=1))
        return
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, channels-last, "
          f"{'bfloat16' if bf16 else 'float32'} (as `audioshard train` runs here)")
    for spec, row in result.items():
        print(f"  {spec:<14} {row['ms_per_step']:>8.1f} ms/step  {row['vs_first']:.2f}x the time of {args.models[0]}"
              f"  {row['parameters_m']:.2f} M parameters")


MALLOC_STATES = {"fresh": "a fresh process", "after-build": "after an in-process build",
                 "128k": "thresholds at 128 kB (before the fix)"}


def enter_malloc_state(state: str) -> None:
    """Put this process's glibc malloc where `state` says (first thing, before anything is timed)."""
    from audioshard.parallel import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc, keeping_freed_memory

    if state == "after-build":
        with keeping_freed_memory():
            pass
    elif state == "128k" and (libc := _glibc()) is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10), libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)


def compare_malloc_states(args: argparse.Namespace) -> None:
    """The train step (as train runs it here) in each malloc state, each in its own fresh interpreter (a
    threshold once set stays set, and the first variant timed in a process is slower): states take turns."""
    import subprocess
    import sys

    best = dict.fromkeys(MALLOC_STATES, float("inf"))
    for _ in range(args.repeat):
        for state in MALLOC_STATES:
            out = subprocess.run([sys.executable, __file__, "--malloc-state", state, "--model", args.model,
                                  "--width", str(args.width), "--batch", str(args.batch), "--steps",
                                  str(args.steps), "--warmup", str(args.warmup)],
                                 capture_output=True, text=True, check=True).stdout
            best[state] = min(best[state], float(out))
    fresh = best["fresh"]
    result = {MALLOC_STATES[k]: {"ms_per_step": round(1000 * t, 1), "vs_fresh": round(t / fresh, 2)}
              for k, t in best.items()}
    if args.json:
        print(json.dumps({"model": f"{args.model} width {args.width}", "states": result}, indent=1))
        return
    print(f"{args.model} width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads, as train runs here")
    for name, row in result.items():
        print(f"  {name:<40} {row['ms_per_step']:>8.1f} ms/step  {row['vs_fresh']:.2f}x a fresh process")


if __name__ == "__main__":
    main()
