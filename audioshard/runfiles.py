"""What a training run writes, and the lines it prints per epoch: rank 0's job.

`RunWriter` owns the run folder: `config.toml`, `history.jsonl`, `last.pt` and `best_model.pt` each
epoch (and mid-epoch with `train.save_every_steps`), TensorBoard scalars; at the end the curves, the
confusion matrix in TensorBoard and `report.html`. Other ranks get a `NullWriter`, so the training loop
has no `if rank == 0` of its own. The loop hands over records and a way to make the checkpoint, never
itself: a writer cannot reach into the run (as torchtune's metric loggers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audioshard.checkpoint import Checkpoint, save_checkpoint
from audioshard.config import Config, ConfigError, dump_toml
from audioshard.distributed import print0
from audioshard.manifest import write_text_atomic

BOARD_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_clip_macro_f1", "lr")


class RunWriter:
    """Every file a run writes and every line it prints per epoch (rank 0)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.board = None  # a TensorBoard SummaryWriter, with train.tensorboard

    def config(self, cfg: Config) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.toml", dump_toml(cfg))  # a full disk leaves the old file
        if cfg.train.tensorboard:
            self.board = tensorboard_writer(self.run_dir)

    def history(self, history: list[dict[str, Any]]) -> None:
        with open(self.run_dir / "history.jsonl", "w", encoding="utf-8") as stream:
            stream.writelines(json.dumps(h) + "\n" for h in history)

    def epoch(self, checkpoint: Callable[[], Checkpoint], record: dict[str, Any], improved: bool,
              epochs: int) -> None:
        """The end of an epoch: last.pt (and best_model.pt when `improved`), its history line, its scalars
        and its printed line. `checkpoint()` makes the checkpoint (only here: other ranks never pay for it)."""
        ckpt = checkpoint()
        save_checkpoint(self.run_dir / "last.pt", ckpt)
        if improved:
            save_checkpoint(self.run_dir / "best_model.pt", ckpt.without_training())
        with open(self.run_dir / "history.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key in BOARD_SCALARS:
                self.board.add_scalar(key.replace("_", "/", 1), record[key], record["epoch"])
            self.board.flush()
        print0(f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
               f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
               f"acc {record['val_accuracy']:.3f} macro-F1 {record['val_macro_f1']:.3f} "
               f"recording macro-F1 {record['val_clip_macro_f1']:.3f} | {record['seconds']:.1f}s"
               f"{'  *best' if improved else ''}")

    def position(self, checkpoint: Callable[[], Checkpoint], position: dict[str, Any]) -> None:
        """last.pt in the middle of an epoch (train.save_every_steps); the epoch-end files stay as they are."""
        save_checkpoint(self.run_dir / "last.pt", checkpoint())
        print0(f"saved {self.run_dir / 'last.pt'} at epoch {position['epoch'] + 1} step {position['step']}")


class NullWriter(RunWriter):
    """The writer of ranks other than 0: writes nothing."""

    def __init__(self):
        pass

    def config(self, cfg: Config) -> None:
        pass

    def history(self, history: list[dict[str, Any]]) -> None:
        pass

    def epoch(self, checkpoint: Callable[[], Checkpoint], record: dict[str, Any], improved: bool,
              epochs: int) -> None:
        pass

    def position(self, checkpoint: Callable[[], Checkpoint], position: dict[str, Any]) -> None:
        pass


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exn:  # torch raises ImportError when the tensorboard package is missing
        raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install tensorboard (from "
                          "a checkout: pip install -e '.[tensorboard]'), or set train.tensorboard = false") from exn
    return SummaryWriter(str(run_dir / "tensorboard"))


def board_confusion(run_dir: Path) -> None:
    """The val confusion matrix as an image in the run's TensorBoard log, at the end of training."""
    import matplotlib.image

    image = run_dir / "val_confusion_matrix.png"
    if image.exists():
        board = tensorboard_writer(run_dir)
        board.add_image("val/confusion_matrix", matplotlib.image.imread(image)[..., :3], dataformats="HWC")
        board.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train (chunk)")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val (chunk)")
    ax_acc.plot(epochs, [h["val_clip_macro_f1"] for h in history], label="val macro-F1 (recording)")
    ax_acc.set_xlabel("epoch")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(run_dir: Path) -> None:
    """report.html at the end of a run; a failure to draw it costs the run nothing (it says how to retry)."""
    from audioshard.report import write_report

    try:
        print0(f"report: {write_report(run_dir)}")
    except Exception as exn:  # noqa: BLE001 - the run's results are written already; the page is extra
        print0(f"note: report.html not written ({type(exn).__name__}: {exn}); retry with `audioshard report "
               f"{run_dir}`")
