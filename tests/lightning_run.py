"""A real `lightning.Trainer` over a build, as a user would run it (tests/test_lightning.py runs this file in
its own process; under --devices 2 Lightning starts the second rank by running this file again).
Every rank appends one line per train step to OUT/rank{R}.jsonl: epoch, step and the (source, start)
of each chunk of the batch."""

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from audioshard.lightning import ShardDataModule


class Tiny(L.LightningModule):
    """A linear head on the mean over time of each mel band: just enough to have a loss to step."""

    def __init__(self, n_mels: int, classes: int, out: str):
        super().__init__()
        self.head, self.out = torch.nn.Linear(n_mels, classes), Path(out)

    def training_step(self, batch, index):
        pairs = [[int(s), float(t)] for s, t in zip(batch.source, batch.start, strict=True)]
        with open(self.out / f"rank{self.global_rank}.jsonl", "a") as stream:
            stream.write(json.dumps({"epoch": self.current_epoch, "step": self.global_step, "pairs": pairs}) + "\n")
        return torch.nn.functional.cross_entropy(self.head(batch.x.mean(dim=(1, 3))), batch.y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N train steps")
    parser.add_argument("--resume", help="a checkpoint to continue from")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = ShardDataModule(args.shards, batch_size=8, num_workers=args.workers)
    data.setup()
    model = Tiny(data.manifest.features.n_mels, len(data.classes), str(args.out))
    callbacks = [ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.checkpoint_every, save_top_k=-1,
                                 filename="{epoch}-{step}")] if args.checkpoint_every else []
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
