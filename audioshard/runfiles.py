"""What a training run writes, and the lines it prints per epoch: rank 0's job.

`RunWriter` owns the run folder: `config.toml`, `history.jsonl`, `last.pt` and `best_model.pt` each
epoch (and mid-epoch with `train.save_every_steps`), TensorBoard scalars; at the end the curves, the
confusion matrix in TensorBoard and `report.html`. Other ranks get a `NullWriter`, so the training loop
has no `if rank == 0` of its own. The loop hands over records and a way to make the checkpoint, never
itself: a writer cannot reach into the run (as torchtune's metric loggers).

`finalize` ends a run: the selected model evaluated on val and test, `metrics.json`, the reports and
confusion matrices, the curves and the page (written by rank 0; every rank takes part in the evaluation).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from audioshard import multilabel
from audioshard.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from audioshard.config import Config, ConfigError, dump_toml
from audioshard.distributed import Dist, barrier, print0
from audioshard.evaluate import draw, iter_metrics_lines, predict_split, write_json, write_reports
from audioshard.manifest import Manifest, write_text_atomic

BOARD_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_clip_macro_f1", "lr")


def _map_text(record: dict[str, Any]) -> str:
    """A multi-label run's recording-level mAP on val, for the epoch line."""
    return f" mAP {record['val_mAP']:.3f}" if "val_mAP" in record else ""


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
            for key in (*BOARD_SCALARS, "val_mAP"):  # mAP: a multi-label run's
                if key in record:
                    self.board.add_scalar(key.replace("_", "/", 1), record[key], record["epoch"])
            self.board.flush()
        print0(f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
               f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
               f"acc {record['val_accuracy']:.3f} macro-F1 {record['val_macro_f1']:.3f} "
               f"recording macro-F1 {record['val_clip_macro_f1']:.3f}{_map_text(record)} | {record['seconds']:.1f}s"
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


def board_final(run_dir: Path, results: dict[str, Any]) -> None:
    """What the run's TensorBoard log gets at the end of training: the val confusion matrix as an image, or
    for a multi-label run each class's val average precision and F1 at its threshold (recording level)."""
    import matplotlib.image

    image, val = run_dir / "val_confusion_matrix.png", results.get("val", {})
    board = tensorboard_writer(run_dir)
    if image.exists():
        board.add_image("val/confusion_matrix", matplotlib.image.imread(image)[..., :3], dataformats="HWC")
    for name, row in val.get("clip", {}).get("per_class", {}).items() if val.get("multilabel") else ():
        board.add_scalar(f"val_AP/{name}", row["ap"], results["best_epoch"])
        board.add_scalar(f"val_F1/{name}", row["f1"], results["best_epoch"])
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _choose_thresholds(pred: dict[str, Any], best: Checkpoint, best_path: Path, dist: Dist) -> list[float]:
    """A multi-label model's per-class thresholds, chosen on the val split's recordings (the F1-best of each
    class) and saved in best_model.pt, so that evaluate, predict and exports decide as reported here."""
    probs, truth = multilabel.per_recording(multilabel.probabilities(pred["logits"]), pred["y"], pred["source"])
    thresholds = multilabel.choose_thresholds(probs, truth)
    if dist.is_main:
        save_checkpoint(best_path, dataclasses.replace(best, thresholds=thresholds))
    return thresholds


def finalize(model: torch.nn.Module, manifest: Manifest, run_dir: Path, cfg: Config, history: list[dict[str, Any]],
             best_epoch: int, dist: Dist, bf16_autocast: bool = False) -> dict[str, Any]:
    """Evaluate the best model on val and test and write the artifacts (rank 0 writes)."""
    best_path = run_dir / "best_model.pt"
    if dist.enabled:
        barrier()  # rank 0 has finished writing best_model.pt
    best = read_checkpoint(best_path)
    model.load_state_dict(best.weights)
    device = dist.device
    results: dict[str, Any] = {"best_epoch": best_epoch + 1, "epochs": cfg.train.epochs, "classes": manifest.classes}
    thresholds = best.thresholds
    for split in ("val", "test"):
        if manifest.samples(split) == 0:
            continue
        pred = predict_split(model, manifest, split, device, cfg.train.batch_size, cfg.train.num_workers,
                             cfg.shards.strict)
        if split == "val" and best.multilabel:  # every rank decides the same: the predictions are gathered
            thresholds = _choose_thresholds(pred, best, best_path, dist)
        if dist.is_main:
            results[split] = write_reports(run_dir, split, pred, manifest.classes,
                                           label_prefix="" if split == "val" else "test_",
                                           recordings=manifest.sources(split), thresholds=thresholds)
            print0(f"{split} (best epoch {best_epoch + 1}):")
            for line in iter_metrics_lines(results[split]):
                print0("  " + line)
    if dist.is_main:
        if "val" in results:
            results["majority_baseline"] = results["val"]["chunk"].get("majority_baseline")
        # Bad blocks or shards skipped: while training (each epoch's pass, summed) and in the final evaluation.
        results["skipped_blocks"] = {"train": sum(h.get("skipped_blocks_train", 0) for h in history),
                                     **{s: results[s]["skipped_blocks"] for s in ("val", "test") if s in results}}
        seconds = [h["seconds"] for h in history]
        where = manifest.root if "://" in manifest.root else str(Path(manifest.root).resolve())  # for `report`
        results.update({"shards": where, "device": _device_name(device), "train_seconds": sum(seconds),
                        "bf16_autocast": bf16_autocast,
                        "seconds_per_epoch": sum(seconds) / max(1, len(seconds))})
        write_json(run_dir / "metrics.json", results)
        if history:  # after metrics.json: a picture that cannot be drawn is reported, never costs the results
            draw(run_dir / "training_curves.png", plot_curves, history, run_dir / "training_curves.png")
        if cfg.train.tensorboard:
            board_final(run_dir, results)
        report(run_dir)
        matrix = "" if manifest.multilabel else "val_confusion_matrix.png, "  # no one cell per chunk to count
        print0(f"artifacts in {run_dir}/: best_model.pt, last.pt, history.jsonl, metrics.json, val_report.txt, "
               f"{matrix}pred_labels.npy, true_labels.npy, test_report.txt, training_curves.png, report.html")
    if dist.enabled:
        barrier()  # leave together: a rank tearing gloo down while rank 0 still writes can abort
    return results

