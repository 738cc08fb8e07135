"""Train a classifier by streaming shards.

    audioshard train --shards shards/ --out runs/first                  # one process (GPU if any)
    audioshard train --shards https://host/shards/ --out runs/remote    # shards over HTTP(S)
    audioshard train --shards shards/ --out runs/first --resume         # continue from last.pt
    torchrun --nproc_per_node=4 -m audioshard train --shards shards/ --out runs/ddp

What happens, top to bottom: load the manifest; build the model, optimizer and schedule; overfit
one batch as a sanity check (fail loudly if the loss does not drop); then per epoch stream the
train split, normalise and augment each batch on the device, step, evaluate the val split
(chunk- and recording-level), write `history.jsonl`, `last.pt` and, when `train.select_metric`
picks the epoch (by default the last: the end of the schedule), `best_model.pt`. At the end
the best model is evaluated on val and test and the run's files are written (docs/training.md lists them). Every random
draw is seeded per epoch, so `--resume` reaches the same weights as an uninterrupted run.

Under DDP `train.batch_size` is per rank: the global batch is batch_size x world size, and the
learning rate is used as given (scale it yourself if you scale the global batch).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from audioshard.augment import BatchTransform
from audioshard.checkpoint import Checkpoint, check_compatible, read_checkpoint, resume_problem
from audioshard.config import Config, ConfigError, from_dict, validate
from audioshard.distributed import Dist, all_reduce_sum, cleanup_distributed, print0, setup_distributed
from audioshard.errors import AudioshardError
from audioshard.evaluate import predict_split, summarize
from audioshard.loader import make_loader
from audioshard.manifest import Manifest, load_manifest
from audioshard.models import build_model, freeze_backbone, load_pretrained, model_args
from audioshard.multilabel import DEFAULT_THRESHOLD
from audioshard.pretrained import load_init_weights
from audioshard.progress import progress as progress_bar
from audioshard.runfiles import NullWriter, RunWriter, finalize
from audioshard.schedule import class_weights, lr_lambda, mixed_loss, mixup, planned_epochs, top1_hits, weight_average
from audioshard.stream import ShardStream


def _trace(path: Path, epoch: int, rank: int, steps: int, seen: list[torch.Tensor]) -> None:
    """Debugging aid (AUDIOSHARD_TRACE_DIR): every rank saves the (source, start) of each chunk it trained on
    per epoch, so that data order and the rank/worker split can be inspected (and are, by the DDP tests)."""
    path.mkdir(parents=True, exist_ok=True)
    pairs = torch.cat(seen).numpy() if seen else np.zeros((0, 2))
    np.savez(path / f"epoch{epoch}-rank{rank}.npz", pairs=pairs, steps=np.array(steps))


class TrainingError(AudioshardError, RuntimeError):
    """Training cannot go on (failed sanity check, unusable data)."""


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the train step runs in bfloat16 autocast: `train.precision`, where "auto" means where the
    hardware multiplies bfloat16 natively. CUDA GPUs do. A CPU does with AMX tiles (Intel Xeon 4th gen and
    later): a train step of the default model there 2.0x faster than float32. CPUs without them emulate
    it in oneDNN: measured here with AMX switched off, 0.7x with AVX512-BF16 and 0.1x with AVX2. Weights,
    optimizer and loss stay float32 either way (mixed precision); evaluation runs in float32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # not in older torch: float32 there
    return device.type == "cpu" and capabilities is not None and bool(capabilities().get("amx_bf16"))


def uses_channels_last(device: torch.device) -> bool:
    """Model and batches in channels-last layout: on a CPU (oneDNN's preferred layout), where a train step
    of the default model is 1.1-1.2x faster in float32 and 1.5x in bfloat16. Not measured on GPUs, so
    left as it was there."""
    return device.type == "cpu"


def sanity_check(model: torch.nn.Module, batch, transform: BatchTransform, device: torch.device, steps: int,
                 lr: float, frozen: bool = False) -> tuple[float, float]:
    """Overfit one batch on a copy of the model (a setup that cannot, cannot learn); returns (first, last) loss."""
    probe = copy.deepcopy(model).to(device).train()
    if frozen:
        freeze_backbone(probe)
    # A head alone on fixed features is a convex problem: a 10x larger step is safe and lets it show
    # in the same few steps whether the labels can be learned.
    optimizer = torch.optim.Adam([p for p in probe.parameters() if p.requires_grad],
                                 lr=max(lr, 1e-2 if frozen else 1e-3))
    x = transform(batch._replace(x=batch.x.to(device))).x
    y = batch.y.to(device)
    losses = []
    for _ in range(steps):
        loss = mixed_loss(probe(x), y, y, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], min(losses[-3:])


def _init_from_checkpoint(model: torch.nn.Module, args: dict[str, Any], manifest: Manifest, path: str) -> None:
    """Start from the user's own checkpoint: same architecture and features; the head is fresh where
    the classes differ. Read with weights_only (never unpickled); nothing is downloaded."""
    card = read_checkpoint(path)
    theirs = {k: card.model_args.get(k) for k in ("name", "width")}
    ours = {k: args[k] for k in ("name", "width")}
    if theirs != ours:
        raise ConfigError(f"model.init_checkpoint {path} holds model {theirs}, but this run builds {ours}: set "
                          f"model.name and model.width to match it")
    theirs_features = card.features.to_dict()
    differ = sorted(k for k, v in manifest.features.to_dict().items()
                    if k != "chunk_seconds" and theirs_features.get(k) != v)  # a CNN pools over any length
    if differ:
        raise ConfigError(f"model.init_checkpoint {path} was trained on other features ({', '.join(differ)} differ "
                          "from these shards'); rebuild the shards with its [audio] and [features] settings")
    loaded, fresh = load_pretrained(model, card.weights)
    print0(f"initialised {len(loaded)} of {len(loaded) + len(fresh)} tensors from {path}"
           + (f"; new: {', '.join(fresh)}" if fresh else ""))


def _score(metrics: dict[str, Any], select: str) -> tuple[float, float]:
    """Higher is better: (selection metric, -val loss as tie-breaker)."""
    loss = metrics["loss"]
    value = {"clip_macro_f1": metrics["clip"]["macro_f1"], "macro_f1": metrics["chunk"]["macro_f1"],
             "accuracy": metrics["chunk"]["accuracy"], "loss": -loss,
             "mAP": metrics["clip"].get("mAP", math.nan)}[select]
    return (value if not math.isnan(value) else -math.inf, -loss if not math.isnan(loss) else -math.inf)


def _check_finite_loss(loss_sum: float, first_bad_step: int, epoch: int, cfg: Config) -> None:
    """Stop before a non-finite loss turns into NaN weights, checkpoints and metrics that look like results."""
    if math.isfinite(loss_sum):
        return
    where = f" at step {first_bad_step + 1}" if first_bad_step >= 0 else " (on another rank)"
    raise TrainingError(f"the training loss became NaN or infinite in epoch {epoch + 1}{where}: training "
                        f"diverged. Lower train.lr (now {cfg.train.lr:g}), e.g. --set train.lr={cfg.train.lr / 10:g}; "
                        "checkpoints of earlier epochs, if any, are kept")


def _check_data(manifest: Manifest, cfg: Config, dist: Dist) -> None:
    samples = manifest.samples("train")
    if samples == 0:
        raise TrainingError(f"{manifest.root}: the train split is empty; rebuild with more data")
    if cfg.train.batch_size > samples:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the train split "
                          f"({samples} chunks); lower it, e.g. --set train.batch_size={max(1, samples // 4)}")
    if cfg.train.select_metric == "mAP" and not manifest.multilabel:
        raise ConfigError(f"train.select_metric = 'mAP' is for multi-label builds; {manifest.root} holds one class per "
                          "recording: pick 'clip_macro_f1', 'accuracy' or 'last'")
    if cfg.train.balanced and manifest.multilabel:
        raise ConfigError(f"train.balanced = true: {manifest.root} is a multi-label build, whose chunks hold several "
                          "classes each, and balanced sampling counts one class per chunk; set train.balanced = false")
    readers = dist.world_size * max(1, cfg.train.num_workers)
    if samples < readers * manifest.block_size // 2 and cfg.train.num_workers > 0:
        print0(f"note: {samples} train chunks for {readers} readers; some loader workers will have little to do")


def train(shards: str, run_dir: str | Path, cfg: Config, resume: bool = False, progress: bool = True,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train on a build's shards; writes checkpoints, history and artifacts into `run_dir`.

    Args:
        shards: build folder, or an http(s):// or s3:// URL of one.
        cfg: the resolved config (its [train], [augment] and [model] sections are used).
        resume: continue from `run_dir/last.pt` (its saved config wins, except train.epochs).
        stop_after_epoch: stop as if interrupted after this many epochs (for tests and time limits).

    Returns:
        The metrics written to `metrics.json` (empty when stopped early).
    """
    dist = setup_distributed(cfg.train.device)
    run_dir = Path(run_dir)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (run_dir / "last.pt").exists():
        resume = True  # torchrun --max-restarts restarted us after a failure: continue, do not start over
    try:
        return _train(shards, run_dir, cfg, dist, resume, progress, stop_after_epoch)
    finally:
        cleanup_distributed()


def _train(shards: str, run_dir: Path, cfg: Config, dist: Dist, resume: bool, progress: bool,
           stop_after_epoch: int | None) -> dict[str, Any]:
    manifest = load_manifest(shards, cfg.fetcher())
    state, cfg = _restore(run_dir, cfg, manifest) if resume else (None, cfg)
    cfg = _plan(cfg, manifest, dist)
    writer = RunWriter(run_dir) if dist.is_main else NullWriter()
    writer.config(cfg)
    run = _setup(shards, cfg, manifest, dist, resuming=state is not None)
    if state is not None:
        run.load(state)
        where = f"epoch {run.start_epoch + 1} step {run.position['step']}" if run.position else \
            f"the end of epoch {run.start_epoch}"
        print0(f"resuming from {run_dir / 'last.pt'} at {where} of {cfg.train.epochs}")
    elif cfg.train.sanity_steps:
        _sanity_or_fail(run)
    run.finish(state)
    writer.history(run.history)  # exactly the epochs in last.pt (a crash may have left one more)
    try:
        for epoch in range(run.start_epoch, cfg.train.epochs):
            started = time.time()
            record = _train_epoch(run, epoch, progress and dist.is_main, writer)
            metrics = _validate(run, record)
            record["seconds"] = round(time.time() - started, 2)
            improved = run.select(epoch, record, metrics)
            writer.epoch(partial(run.checkpoint, epoch, record), record, improved, cfg.train.epochs)
            if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < cfg.train.epochs:
                return _stopped(run_dir)
    except KeyboardInterrupt:
        return _stopped(run_dir)
    return finalize(run.model, manifest, run_dir, cfg, run.history, run.best_epoch, dist,
                    bf16_autocast=uses_bf16(cfg.train.precision, dist.device))


def _stopped(run_dir: Path) -> dict[str, Any]:
    print0(f"stopped; the last finished epoch is saved in {run_dir / 'last.pt'}: continue with --resume")
    return {}


def _restore(run_dir: Path, cfg: Config, manifest: Manifest) -> tuple[Checkpoint, Config]:
    """`--resume`: last.pt and the config it was trained with (an explicit train.epochs wins)."""
    last = run_dir / "last.pt"
    if not last.exists():
        raise TrainingError(f"--resume: {last} not found; start without --resume")
    card = read_checkpoint(last)
    check_compatible(card, manifest, str(last))
    try:
        saved = validate(from_dict(card.config))
    except ConfigError as exn:  # values are checked scalars (checkpoint.check_schema): safe to show
        raise TrainingError(f"--resume: {last} holds settings this version refuses ({exn}); start without "
                            "--resume") from exn
    saved.train.epochs = cfg.train.epochs
    return card, saved


def _plan(cfg: Config, manifest: Manifest, dist: Dist) -> Config:
    """Check the data against the settings and resolve the automatic schedule."""
    _check_data(manifest, cfg, dist)
    if not cfg.train.epochs:
        cfg.train.epochs = planned_epochs(cfg, manifest.samples("train"))
        print0(f"train.epochs = 0 (auto): {cfg.train.epochs} epochs, about train.samples_budget = "
               f"{cfg.train.samples_budget:,} examples over {manifest.samples('train'):,} train chunks")
    return cfg


@dataclass
class Run:
    """What one training run holds: the model and its optimizer, the data, and the record so far."""

    shards: str
    cfg: Config
    manifest: Manifest
    dist: Dist
    args: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weight: torch.Tensor | None
    train_data: ShardStream
    train_loader: Any
    augment: BatchTransform
    plain: BatchTransform
    steps_per_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch: int = -1
    start_epoch: int = 0
    averaged: AveragedModel | None = None
    ddp_model: torch.nn.Module | None = None  # what the train step calls: the model, wrapped under DDP
    bf16: bool = False  # the train step's forward in bfloat16 autocast (train.precision)
    position: dict[str, Any] | None = None  # where a last.pt saved mid-epoch stopped (taken by the next epoch)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def channels_last(self) -> bool:
        return uses_channels_last(self.device)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is evaluated, selected and saved: the weight average when there is one."""
        return self.averaged.module if self.averaged is not None else self.model

    def steps_in(self, epoch: int) -> int:
        # Every rank runs the same number of steps, or DDP would hang at the last all-reduce:
        # the most any rank has; ranks with fewer batches wrap around to their first ones.
        self.train_data.set_epoch(epoch)
        return max(self.train_data.batches_per_epoch(rank=r) for r in range(self.dist.world_size))

    def load(self, last: Checkpoint) -> None:
        """Continue from a last.pt. With weight averaging, its weights are the average (what predict
        and export load) and the weights being trained are kept beside it."""
        state = last.training
        if "optimizer" not in state:
            raise TrainingError("--resume needs a last.pt (it holds the training state); best_model.pt does not")
        fix = "it was edited or not written by this run's `audioshard train`; start without --resume"
        problem = resume_problem(state, self.optimizer, self.scheduler)
        if problem:
            raise TrainingError(f"--resume: last.pt {problem}: {fix}")
        try:  # what torch checks itself: weight names and shapes, parameter group sizes
            self.model.load_state_dict(state["trained_weights"]["model"] if "trained_weights" in state
                                       else last.weights)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exn:
            detail = (str(exn).splitlines() or [""])[0][:300]
            raise TrainingError(f"--resume: last.pt does not fit this run ({type(exn).__name__}: {detail}): "
                                f"{fix}") from exn
        self.history, self.start_epoch = list(state["history"]), last.epoch + 1
        self.best, self.best_epoch = tuple(state["best_score"]), int(state["best_epoch"])
        torch.set_rng_state(state["rng"]["torch"])
        self.position = state.get("position")
        if self.position is not None and self.position["world_size"] != self.dist.world_size:
            saved = self.position["world_size"]
            raise TrainingError(f"--resume: last.pt was saved in the middle of an epoch by {saved} processes and "
                                f"this run has {self.dist.world_size}; resume with the same number (an exact "
                                "mid-epoch resume needs it)")
        if self.position is not None and self.position["step"] > self.steps_in(self.start_epoch):
            raise TrainingError(f"--resume: last.pt says epoch {self.start_epoch + 1} stopped after step "
                                f"{self.position['step']}, but an epoch of these shards has "
                                f"{self.steps_in(self.start_epoch)} steps: {fix}")

    def finish(self, last: Checkpoint | None) -> None:
        """Once the weights are final (restored or sanity-checked): start the weight average
        (train.ema_epochs; restored from `last` when resuming) and wrap the model for DDP."""
        self.averaged = weight_average(self.model, self.cfg, self.steps_per_epoch)
        if self.averaged is not None and last is not None and "trained_weights" in last.training:
            self.averaged.module.load_state_dict(last.weights)
            self.averaged.n_averaged.fill_(last.training["trained_weights"]["n_averaged"])
        self.ddp_model = self.model
        if self.dist.enabled:
            cuda = self.device.type == "cuda"
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)

    def select(self, epoch: int, record: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Append the epoch to the history; True when it becomes best_model.pt."""
        self.history.append(record)
        if self.cfg.train.select_metric == "last":  # the end of the schedule, whatever val says
            score = (float(epoch), 0.0)
        else:
            has_val = self.manifest.samples("val") > 0
            score = _score(metrics, self.cfg.train.select_metric if has_val else "loss")
        if score <= self.best:
            return False
        self.best, self.best_epoch = score, epoch
        return True

    def checkpoint(self, epoch: int, record: dict[str, Any], position: dict[str, Any] | None = None) -> Checkpoint:
        """Everything `--resume` needs (last.pt); `without_training()` is best_model.pt, what predict and
        export read. `position`: where in the next epoch it was saved, when saved mid-epoch."""
        # The [audio] and [features] sections saved are the build's (chunking rules, features), so `predict`
        # cuts new recordings exactly as the shards were cut, whatever the training command's own said.
        saved_config = self.cfg.to_dict()
        for section, values in self.manifest.build_config().items():
            saved_config[section] = values or saved_config[section]
        training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "history": self.history, "best_score": list(self.best), "best_epoch": self.best_epoch,
                    "rng": {"torch": torch.get_rng_state()}}
        if position is not None:
            training["position"] = position
        if self.averaged is not None:
            training["trained_weights"] = {"model": self.model.state_dict(),
                                           "n_averaged": int(self.averaged.n_averaged)}
        return Checkpoint(weights=self.eval_model.state_dict(), model_args=self.args, classes=self.manifest.classes,
                          features=self.manifest.features, mean=self.manifest.mean, std=self.manifest.std,
                          config=saved_config, epoch=epoch, metrics=record, training=training,
                          thresholds=[DEFAULT_THRESHOLD] * len(self.manifest.classes) if self.manifest.multilabel
                          else None)  # chosen on val at the end of the run (runfiles.finalize)


def _setup(shards: str, cfg: Config, manifest: Manifest, dist: Dist, resuming: bool) -> Run:
    """Model (seeded), optimizer, learning-rate schedule, the train stream and its transforms."""
    torch.manual_seed(cfg.train.seed)
    args = model_args(cfg.model.name, len(manifest.classes), cfg.model.width, cfg.model.dropout, cfg.model.input_norm,
                      cfg.model.members, manifest.features.n_mels)
    model = build_model(args)
    if cfg.model.init_checkpoint and not resuming:  # a resumed run already holds these weights
        _init_from_checkpoint(model, args, manifest, cfg.model.init_checkpoint)
    if cfg.model.init_weights and not resuming:  # published PANNs weights, checked against these shards
        print0(load_init_weights(model, cfg.model.init_weights, cfg.model.name, manifest.features, manifest.mean,
                                 manifest.std).summary(cfg.model.init_weights))
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    model = model.to(dist.device)
    bf16, channels_last = uses_bf16(cfg.train.precision, dist.device), uses_channels_last(dist.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    print0(f"training arithmetic: {'bfloat16 autocast' if bf16 else 'float32'}"
           f"{', channels-last' if channels_last else ''} (train.precision = {cfg.train.precision})")
    optimizer_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                              weight_decay=cfg.train.weight_decay)
    # Class weights balance one softmax over classes: not with one sigmoid per class (multi-label), nor when
    # batches are already drawn class-balanced (train.balanced: that would correct the imbalance twice).
    weighted = cfg.train.class_weights and not manifest.multilabel and not cfg.train.balanced
    weight = class_weights(manifest).to(dist.device) if weighted else None
    train_data = ShardStream(manifest, "train", cfg.train.batch_size, shuffle=True,
                             shuffle_blocks=cfg.train.shuffle_blocks, seed=cfg.train.seed,
                             rank=dist.rank, world_size=dist.world_size, strict=cfg.shards.strict,
                             balanced=cfg.train.balanced)
    train_loader = make_loader(train_data, cfg.train.num_workers, pin_memory=_pinned(cfg, dist),
                               prefetch_factor=cfg.train.prefetch_factor)
    run = Run(shards, cfg, manifest, dist, args, model, optimizer, None, weight, train_data, train_loader,
              BatchTransform.from_manifest(manifest, cfg.augment, enabled=True),
              BatchTransform(manifest.mean, manifest.std), steps_per_epoch=0, bf16=bf16)
    run.steps_per_epoch = run.steps_in(0)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, run.steps_per_epoch))
    return run


def _pinned(cfg: Config, dist: Dist) -> bool:
    return cfg.train.pin_memory and dist.device.type == "cuda"


def _sanity_or_fail(run: Run) -> None:
    """Overfit one batch first: a setup that cannot learn it fails now, not after hours of training."""
    cfg = run.cfg
    probe_data = ShardStream(run.manifest, "train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                             rank=run.dist.rank, world_size=run.dist.world_size)
    first_batch = next(iter(probe_data))
    first, last = sanity_check(run.model, first_batch, run.plain, run.device, cfg.train.sanity_steps, cfg.train.lr,
                               cfg.model.freeze_backbone)
    print0(f"sanity check: overfitting one batch of {len(first_batch.y)} for {cfg.train.sanity_steps} steps, "
           f"loss {first:.4f} -> {last:.4f}")
    if not last < 0.8 * first:  # a healthy setup drops far more; the plain seed_cnn ~40% in 30 steps
        raise TrainingError(f"sanity check failed: the loss on one repeated batch went only from {first:.4f} to "
                            f"{last:.4f}; check the data (labels, normalisation) and train.lr before training")


class _EqualSteps:
    """`steps` train batches of this rank as (step, batch) from step `start`, wrapping around when it has
    fewer than another rank (every rank must step equally under DDP). `skipped()`: bad blocks of the first
    pass (a wrapped pass would count them twice)."""

    def __init__(self, run: Run, epoch: int, steps: int, start: int = 0):
        self.run, self.epoch, self.steps, self.start = run, epoch, steps, start
        self.skipped_before = run.train_data.skipped_blocks
        self.first_pass: int | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        data, loader = self.run.train_data, self.run.train_loader
        if self.start:  # resuming mid-epoch: the loader leaves out what this rank's pass already consumed
            own = data.batches_per_epoch()
            if self.start >= own:
                self.first_pass = 0  # the first pass's count is in the saved running sums
            loader.load_state_dict({"epoch": self.epoch, "batches": self.start % own if own else 0})
        batches = iter(loader)
        for step in range(self.start, self.steps):
            batch = next(batches, None)
            if batch is None:
                if self.first_pass is None:
                    self.first_pass = data.skipped_blocks - self.skipped_before
                batches = iter(loader)
                batch = next(batches, None)
                if batch is None:  # not one readable block for this rank
                    shards = self.run.shards
                    raise TrainingError(f"nothing readable in the train split of {shards}: {data.skipped_blocks} "
                                        "bad blocks or shards skipped (the lines above say why); check them with "
                                        f"`audioshard verify {shards}`")
            yield step, batch

    def skipped(self) -> int:
        if self.first_pass is not None:
            return self.first_pass
        return self.run.train_data.skipped_blocks - self.skipped_before


def _train_epoch(run: Run, epoch: int, progress: bool, writer: RunWriter) -> dict[str, Any]:
    """One pass over the train split: seeded draws, augmentation and mixup on the device, one optimizer
    step per batch; with train.save_every_steps, last.pt every that many steps. Returns the epoch's train
    record (loss, accuracy and skipped blocks summed over ranks)."""
    cfg, device = run.cfg, run.device
    steps = run.steps_in(epoch)
    start, sums = _epoch_start(run, epoch)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss
    batches = _EqualSteps(run, epoch, steps, start)
    trace_dir = os.environ.get("AUDIOSHARD_TRACE_DIR", "")
    seen: list[torch.Tensor] = []  # (source, start) pairs, only when tracing
    pin, every = _pinned(cfg, run.dist), cfg.train.save_every_steps
    bar = progress_bar(steps, f"epoch {epoch + 1}/{cfg.train.epochs}", "batch", enabled=progress, lines=False,
                       leave=False)  # off a terminal, the epoch's summary line is the record
    bar.update(start)
    for step, batch in batches:
        if trace_dir:
            seen.append(torch.stack([batch.source.double(), batch.start.double()], dim=1))
        # Every random draw of a step is seeded by (seed, epoch, rank, step): a resumed epoch draws the same.
        x = run.augment(batch._replace(x=batch.x.to(device, non_blocking=pin)), step).x
        y = batch.y.to(device, non_blocking=pin)
        mix_rng = np.random.default_rng([cfg.train.seed, epoch, run.dist.rank, 7, step])
        mixed = mixup(x, y, cfg.train.mixup_alpha, mix_rng, cfg.train.mixup_domain, run.augment.mean, run.augment.std)
        loss, logits = _step(run, *mixed, y)
        with torch.no_grad():
            sums[:3] += torch.stack([loss.detach().double() * len(y), top1_hits(logits, y).double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step,
                                         first_bad_step)  # on the device: no sync per step
        bar.update(1)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            position = _position(run, epoch, step + 1, sums, batches.skipped())  # every rank: sums are reduced
            finished = run.history[-1] if run.history else {}
            writer.position(partial(run.checkpoint, epoch - 1, finished, position), position)
    bar.close()
    if trace_dir:
        _trace(Path(trace_dir), epoch, run.dist.rank, steps, seen)
    sums[3] += batches.skipped()
    loss_sum, correct, count, bad = all_reduce_sum(sums.tolist(), device)
    _check_finite_loss(loss_sum, int(first_bad_step), epoch, cfg)  # every rank: the sum is reduced
    return {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_accuracy": correct / count,
            "lr": run.scheduler.get_last_lr()[0], "steps": steps, "skipped_blocks_train": int(bad)}


def _epoch_start(run: Run, epoch: int) -> tuple[int, torch.Tensor]:
    """(first step, running sums: loss*n, correct, n, skipped blocks) of an epoch, with the model in train
    mode and the epoch's draws seeded; mid-epoch after a resume, as they were when last.pt was saved."""
    cfg = run.cfg
    run.augment.reseed(cfg.train.seed, epoch, run.dist.rank)
    torch.manual_seed(cfg.train.seed * 7919 + epoch)  # dropout draws, per epoch
    run.ddp_model.train()
    if cfg.model.freeze_backbone:
        freeze_backbone(run.model)  # the backbone's BatchNorm layers stay in eval mode
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # summed on the device: no sync per step
    position, run.position = run.position, None
    if position is None or position["epoch"] != epoch:
        return 0, sums
    torch.set_rng_state(position["rng"]["torch"])  # dropout continues where it was
    if run.device.type == "cuda" and "cuda" in position["rng"]:
        try:
            torch.cuda.set_rng_state(position["rng"]["cuda"], run.device)
        except RuntimeError as exn:  # a state of another size (checkpoint.rng_problem bounds it only)
            raise TrainingError(f"--resume: last.pt holds a CUDA generator state torch refuses "
                                f"({str(exn)[:200]}); start without --resume") from exn
    if run.dist.is_main:  # the saved sums are over all ranks: counted once
        sums += torch.tensor(position["sums"], dtype=torch.float64, device=run.device)
    return int(position["step"]), sums


def _position(run: Run, epoch: int, step: int, sums: torch.Tensor, skipped: int) -> dict[str, Any]:
    """What a mid-epoch last.pt holds besides the weights and optimizer: the epoch, the steps done, the
    epoch's running sums over all ranks, and the RNG states. Every rank calls it (the sums are reduced)."""
    totals = all_reduce_sum([*sums[:3].tolist(), float(sums[3]) + skipped], run.device)
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"epoch": epoch, "step": step, "sums": totals, "rng": rng, "world_size": run.dist.world_size}


def _step(run: Run, x: torch.Tensor, y_mix: torch.Tensor, lam: float,
          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (in bfloat16 autocast with run.bf16), the mixup loss, backward, optimizer and schedule step."""
    cfg = run.cfg
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        logits = run.ddp_model(x)
        loss = mixed_loss(logits, y, y_mix, lam, run.weight, cfg.train.label_smoothing)
    if logits.dim() == 3:  # an ensemble's members, each with its loss: the train accuracy is of their mean
        logits = logits.mean(0)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    if run.averaged is not None:
        run.averaged.update_parameters(run.model)
    return loss, logits


def _validate(run: Run, record: dict[str, Any]) -> dict[str, Any]:
    """Score the val split (chunk and recording level) and add it to `record`; without a val split the
    training loss stands in."""
    if run.manifest.samples("val") > 0:
        cfg = run.cfg
        pred = predict_split(run.eval_model, run.manifest, "val", run.device, cfg.train.batch_size,
                             cfg.train.num_workers, cfg.shards.strict)
        logits, y = torch.from_numpy(pred["logits"]), torch.from_numpy(pred["y"]).long()
        val_loss = mixed_loss(logits, y, y, 1.0).item()
        metrics = summarize(pred, run.manifest.classes, loss=val_loss)
    else:
        metrics = {"loss": record["train_loss"], "chunk": {"accuracy": math.nan, "macro_f1": math.nan},
                   "clip": {"macro_f1": math.nan}}
    record.update({"val_loss": metrics["loss"], "val_accuracy": metrics["chunk"]["accuracy"],
                   "val_macro_f1": metrics["chunk"]["macro_f1"], "val_clip_macro_f1": metrics["clip"]["macro_f1"]})
    if "mAP" in metrics["clip"]:  # a multi-label run: the threshold-free figure, shown per epoch
        record["val_mAP"] = metrics["clip"]["mAP"]
    return metrics
