"""A LightningDataModule over a build: `pip install -e '.[lightning]'`.

    from audioshard.lightning import ShardDataModule
    data = ShardDataModule("shards/", batch_size=64, num_workers=2)
    trainer = lightning.Trainer(max_epochs=30, accelerator="auto", devices="auto")
    trainer.fit(model, datamodule=data)          # model: your LightningModule; batch.x, batch.y

What the Trainer does and audioshard needs it to: each epoch, the Trainer calls `set_epoch` on a
loader's `sampler`; the loaders here are their own sampler, so every epoch reads the shards in a new
order with new augmentation draws (a loader without one repeats epoch 0's for ever). Under DDP the
Trainer's rank and world size split the shards exactly as `audioshard train` does (ranks x loader
workers, each shard read once an epoch) and every rank takes the same number of train steps (a rank
with fewer batches starts its share again: unequal steps would hang DDP at the last all-reduce).
The loaders have `state_dict`/`load_state_dict`, which Lightning saves in its checkpoints and restores
on `trainer.fit(..., ckpt_path=...)`: a run resumed from a mid-epoch checkpoint continues with the
batches an uninterrupted run had left (same world size, workers and batch size).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    import lightning as L
except ImportError as exn:  # the extra is optional: say how to get it
    raise ImportError("audioshard.lightning needs Lightning: pip install -e '.[lightning]' "
                      "(or pip install lightning)") from exn

from audioshard.augment import BatchTransform
from audioshard.config import AugmentConfig
from audioshard.loader import make_loader
from audioshard.manifest import Manifest, load_manifest
from audioshard.stream import Batch, ShardStream


class EpochLoader:
    """One split's loader as the Trainer sees it: sized, its own `sampler` (so the Trainer's `set_epoch`
    reaches the stream), stateful, and with `steps` fixed when every rank must take the same number."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool, equal_steps: bool):
        self.stream, self.equal_steps = stream, equal_steps
        self.loader = make_loader(stream, num_workers=num_workers, pin_memory=pin_memory)
        self.sampler = self  # where Lightning looks for set_epoch
        self.step = 0  # batches of the current epoch handed out

    def set_epoch(self, epoch: int) -> None:
        # The Trainer calls this at every epoch start, also right after restoring a mid-epoch position
        # into the same epoch: that position stands.
        if epoch != self.stream.epoch:
            self.loader.set_epoch(epoch)
            self.step = 0

    def __len__(self) -> int:
        if not self.equal_steps:
            return self.stream.batches_per_epoch()
        return max(self.stream.batches_per_epoch(rank=r) for r in range(self.stream.world_size))

    def __iter__(self) -> Iterator[Batch]:
        steps, own = len(self), self.stream.batches_per_epoch()
        if self.step:  # resuming mid-epoch: the stream leaves out what this rank's pass already gave
            self.loader.load_state_dict({"epoch": self.stream.epoch, "batches": self.step % own if own else 0})
        batches = iter(self.loader)
        while self.step < steps:
            batch = next(batches, None)
            if batch is None:  # this rank's share is done before another's: start it again
                batches = iter(self.loader)
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"nothing readable in the {self.stream.split} split of "
                                       f"{self.stream.manifest.root}; check it with `audioshard verify`")
            self.step += 1
            yield batch
        self.step = 0  # the next iteration is a new epoch (or a new evaluation pass)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.stream.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.set_epoch(int(state["epoch"]))
        self.step = int(state["step"])


class ShardDataModule(L.LightningDataModule):
    """Train, val and test loaders over one build (a folder, or an http(s):// or s3:// URL).

    Args:
        shards: the build.
        batch_size: per process, as in `audioshard train`.
        num_workers: loader worker processes per process.
        augment_config: the augmentation of train batches (default: the config defaults); val and
            test batches are only normalised.
        seed: shard order and augmentation draws (with the epoch and the rank).
        fetcher: an `audioshard.remote.Fetcher` for remote builds (cache, timeouts, retries); None =
            the default one.
    """

    def __init__(self, shards: str, batch_size: int = 64, num_workers: int = 2,
                 augment_config: AugmentConfig | None = None, seed: int = 0, shuffle_blocks: int = 16,
                 pin_memory: bool = False, fetcher=None):
        super().__init__()
        self.shards, self.batch_size, self.num_workers = shards, batch_size, num_workers
        self.augment_config, self.seed, self.shuffle_blocks = augment_config or AugmentConfig(), seed, shuffle_blocks
        self.pin_memory, self.fetcher = pin_memory, fetcher
        self.manifest: Manifest | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None:
            self.manifest = load_manifest(self.shards, self.fetcher) if self.fetcher else load_manifest(self.shards)

    @property
    def classes(self) -> list[str]:
        self.setup()
        return self.manifest.classes

    def train_dataloader(self) -> EpochLoader:
        return self._loader("train")

    def val_dataloader(self) -> EpochLoader:
        return self._loader("val")

    def test_dataloader(self) -> EpochLoader:
        return self._loader("test")

    def _loader(self, split: str) -> EpochLoader:
        self.setup()
        train = split == "train"
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        transform = BatchTransform.from_manifest(self.manifest, self.augment_config, enabled=train)
        stream = ShardStream(self.manifest, split, self.batch_size, shuffle=train, shuffle_blocks=self.shuffle_blocks,
                             seed=self.seed, rank=rank, world_size=world_size, transform=transform)
        return EpochLoader(stream, self.num_workers, self.pin_memory, equal_steps=train)
