import json
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from audioshard.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from audioshard.config import ConfigError, load_config
from audioshard.evaluate import evaluate_checkpoint
from audioshard.manifest import load_manifest
from audioshard.train import TrainingError, train, uses_bf16


def history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_end_to_end_artifacts_are_valid(real_build, tiny_run, tmp_path):
    run, metrics = tiny_run
    manifest = load_manifest(real_build)
    for name in ("best_model.pt", "last.pt", "history.jsonl", "metrics.json", "config.toml", "training_curves.png",
                 "val_confusion_matrix.png", "test_confusion_matrix.png", "val_report.txt", "test_report.txt"):
        assert (run / name).stat().st_size > 0, name
    for png in ("val_confusion_matrix.png", "test_confusion_matrix.png", "training_curves.png"):
        assert matplotlib.image.imread(run / png).ndim == 3
    report = (run / "val_report.txt").read_text()
    assert all(c in report for c in manifest.classes) and "Recording level" in report
    pred = np.load(run / "pred_labels.npy", allow_pickle=False)
    true = np.load(run / "true_labels.npy", allow_pickle=False)
    assert len(pred) == len(true) == manifest.samples("val")
    assert len(np.load(run / "test_true_labels.npy", allow_pickle=False)) == manifest.samples("test")
    assert len(history(run)) == 3
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test"]["chunk"]["accuracy"] > saved["test"]["chunk"]["majority_baseline"]
    assert saved["val"]["clip"]["n"] == sum(manifest.split("val").recordings.values())

    out = tmp_path / "eval"
    result = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", out)
    assert result["chunk"]["accuracy"] == pytest.approx(saved["test"]["chunk"]["accuracy"])
    for name in ("test_report.txt", "test_confusion_matrix.png", "metrics.json", "pred_labels.npy",
                 "true_labels.npy"):
        assert (out / name).exists()


def test_checkpoint_is_self_describing_and_safe_to_load(tiny_run, real_build):
    run, _ = tiny_run
    state = torch.load(run / "best_model.pt", weights_only=True)
    assert state["classes"] == ["car", "drone", "speech"]
    assert state["features"] == load_manifest(real_build).features.to_dict()
    assert {"model", "model_args", "normalization", "config", "epoch", "metrics"} <= set(state)
    assert "optimizer" in torch.load(run / "last.pt", weights_only=True)


def test_same_seed_same_history_and_resume_matches(real_build, tiny_run, tmp_path):
    run, _ = tiny_run
    cfg = load_config(overrides=TINY_TRAIN)
    again = tmp_path / "again"  # selection differs (val loss), training must not
    train(str(real_build), again, load_config(overrides=[*TINY_TRAIN, "train.select_metric=loss"]), progress=False)
    for a, b in zip(history(run), history(again), strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    # select_metric "last" (the default): best_model.pt is the final epoch; "loss": the lowest val loss.
    best, last = (torch.load(run / name, weights_only=True) for name in ("best_model.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    lowest = min(range(3), key=lambda e: history(again)[e]["val_loss"])
    assert torch.load(again / "best_model.pt", weights_only=True)["epoch"] == lowest

    resumed = tmp_path / "resumed"
    assert train(str(real_build), resumed, cfg, progress=False, stop_after_epoch=1) == {}
    assert len(history(resumed)) == 1 and not (resumed / "metrics.json").exists()
    train(str(real_build), resumed, cfg, resume=True, progress=False)
    final = torch.load(run / "last.pt", weights_only=True)["model"]
    after = torch.load(resumed / "last.pt", weights_only=True)["model"]
    for key in final:
        torch.testing.assert_close(after[key], final[key], rtol=1e-5, atol=1e-6)
    assert [h["epoch"] for h in history(resumed)] == [1, 2, 3]


def test_weight_average_is_what_is_saved_and_resumes_exactly(real_build, tiny_run, tmp_path):
    """train.ema_epochs: best_model.pt holds the moving average (not the last step's weights), which
    is what the run evaluated; last.pt keeps the trained weights beside it, so --resume continues
    both exactly; training itself is the same as without averaging."""
    plain, _ = tiny_run
    cfg = load_config(overrides=[*TINY_TRAIN, "train.ema_epochs=1"])
    run = tmp_path / "ema"
    metrics = train(str(real_build), run, cfg, progress=False)
    best, last = (torch.load(run / name, weights_only=True) for name in ("best_model.pt", "last.pt"))
    assert "trained_weights" not in best
    assert last["trained_weights"]["n_averaged"] == sum(h["steps"] for h in history(run))
    trained, averaged = last["trained_weights"]["model"], best["model"]
    plain_last = torch.load(plain / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(trained[k], plain_last[k]) for k in plain_last)  # averaging does not change training
    conv = "blocks.0.layers.0.weight"
    assert not torch.equal(averaged[conv], trained[conv])
    assert [h["train_loss"] for h in history(run)] == [h["train_loss"] for h in history(plain)]
    assert metrics["val"]["chunk"]["accuracy"] == evaluate_checkpoint(run / "best_model.pt", str(real_build), "val",
                                                                      tmp_path / "eval")["chunk"]["accuracy"]

    resumed = tmp_path / "ema-resumed"
    train(str(real_build), resumed, cfg, progress=False, stop_after_epoch=1)
    train(str(real_build), resumed, cfg, resume=True, progress=False)
    again = torch.load(resumed / "last.pt", weights_only=True)
    for key in averaged:
        torch.testing.assert_close(again["model"][key], last["model"][key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again["trained_weights"]["model"][key], trained[key], rtol=1e-5, atol=1e-6)


def test_init_from_own_checkpoint_with_other_classes_and_frozen_backbone(real_build, tiny_run, tmp_path, capsys):
    """A user's earlier model (here: 2 other classes) seeds the backbone; only the new head learns."""
    pretrained = load_checkpoint(tiny_run[0] / "best_model.pt")
    pretrained["classes"] = ["bird", "frog"]
    pretrained["model_args"]["num_classes"] = 2
    pretrained["model"]["head.weight"] = pretrained["model"]["head.weight"][:2].clone()
    pretrained["model"]["head.bias"] = pretrained["model"]["head.bias"][:2].clone()
    path = tmp_path / "birds.pt"
    save_checkpoint(path, pretrained)

    run = tmp_path / "finetune"
    cfg = load_config(overrides=[*TINY_TRAIN, f"model.init_checkpoint={path}", "model.freeze_backbone=true"])
    metrics = train(str(real_build), run, cfg, progress=False)
    assert "new: head.bias, head.weight" in capsys.readouterr().out
    tuned = load_checkpoint(run / "best_model.pt")
    assert tuned["classes"] == ["car", "drone", "speech"] and tuned["model"]["head.weight"].shape[0] == 3
    backbone = [k for k in tuned["model"] if not k.startswith("head.")]
    assert backbone and all(torch.equal(tuned["model"][k], pretrained["model"][k]) for k in backbone)  # BN stats too
    assert metrics["test"]["chunk"]["accuracy"] > metrics["test"]["chunk"]["majority_baseline"]

    with pytest.raises(ConfigError, match="model.width"):
        train(str(real_build), tmp_path / "wide", load_config(overrides=[*TINY_TRAIN, "model.width=16",
                                                                        f"model.init_checkpoint={path}"]),
              progress=False)
    with pytest.raises(ConfigError, match="freeze_backbone = true needs model.init_checkpoint"):
        load_config(overrides=["model.freeze_backbone=true"])


def test_sanity_check_fails_loudly(real_build, tmp_path):
    cfg = load_config(overrides=[*TINY_TRAIN, "train.sanity_steps=1"])
    with pytest.raises(TrainingError, match="sanity check failed"):
        train(str(real_build), tmp_path / "r", cfg, progress=False)


def test_bad_setup_fails_before_training(real_build, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size = 100000 is larger than the train split"):
        train(str(real_build), tmp_path / "r", load_config(overrides=["train.batch_size=100000"]), progress=False)
    with pytest.raises(TrainingError, match="last.pt not found"):
        train(str(real_build), tmp_path / "new", load_config(overrides=TINY_TRAIN), resume=True, progress=False)
    other = tmp_path / "other"
    shutil.copytree(real_build, other)
    data = json.loads((other / "manifest.json").read_text())
    data["classes"] = ["car", "drone", "voice"]
    for info in data["splits"].values():  # a consistent manifest of other classes (the schema check wants one)
        for key in ("class_counts", "recordings"):
            info[key]["voice"] = info[key].pop("speech")
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="classes"):
        evaluate_checkpoint(tiny_run[0] / "best_model.pt", str(other), "test", tmp_path / "e")


def test_pickled_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"format": "audioshard-checkpoint", "model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="never loads"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# --- adapting BatchNorm statistics to new data (AdaBN) --------------------------------------------


def batchnorm_outputs(model, x):
    """Each BatchNorm layer's output on x, in eval mode, with its affine part undone: what it normalised."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, _, out: outs.append(((out - m.bias.view(1, -1, 1, 1))
                                                                    / m.weight.view(1, -1, 1, 1)).detach()))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return outs


def test_adapted_batchnorm_normalises_the_new_data_in_every_layer(tiny_run):
    from audioshard.checkpoint import model_from_checkpoint
    from audioshard.models import adapt_batchnorm

    model = model_from_checkpoint(load_checkpoint(tiny_run[0] / "best_model.pt"))
    generator = torch.Generator().manual_seed(0)
    new_data = 3.0 + 2.0 * torch.randn(40, 1, 64, 63, generator=generator)  # shifted and scaled "new device"
    before = batchnorm_outputs(model, new_data)
    assert before[0].mean(dim=(0, 2, 3)).abs().max() > 0.5  # the training statistics no longer centre it
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}

    assert adapt_batchnorm(model, [new_data]) == 40  # one batch: the statistics are exactly this data's
    for out in batchnorm_outputs(model, new_data):
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-3
        assert (out.var(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # only statistics change

    # Batches of unequal size: the first layer's mean is the mean over all examples, not over batches.
    adapt_batchnorm(model, [new_data[:7], new_data[7:]])
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = model.blocks[0].layers[0]
    with torch.no_grad():
        want = conv(model_input_norm(model, new_data)).mean(dim=(0, 2, 3))
    torch.testing.assert_close(first.running_mean, want, atol=1e-4, rtol=1e-4)


def model_input_norm(model, x):
    from audioshard.models import normalize_input

    return normalize_input(x, model.input_norm)


def test_adapting_needs_batchnorm_and_data():
    from audioshard.models import AdaptError, SmallCNN, adapt_batchnorm, build_model

    with pytest.raises(AdaptError, match="no BatchNorm"):
        adapt_batchnorm(SmallCNN(3), [torch.zeros(4, 1, 64, 63)])
    model = build_model({"name": "cnn6", "num_classes": 3, "width": 8, "dropout": 0.2})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaptError, match="no examples"):
        adapt_batchnorm(model, [])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left as it was


def test_evaluate_with_adapt_on_real_shards(tiny_run, real_build, tmp_path):
    run, _ = tiny_run
    plain = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path / "plain")
    adapted = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path / "adapted", adapt=True)
    assert plain["adapted"] == 0 and adapted["adapted"] == load_manifest(real_build).samples("test")
    assert json.loads((tmp_path / "adapted" / "metrics.json").read_text())["adapted"] == adapted["adapted"]
    assert adapted["chunk"]["n"] == plain["chunk"]["n"]


def test_automatic_schedule_is_recorded_in_the_run(real_build, tmp_path):
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.epochs")]
    manifest = load_manifest(real_build)
    budget = 3 * manifest.samples("train") - 1  # just under three epochs' worth: rounds up to 3... then the floor
    run = tmp_path / "auto"
    metrics = train(str(real_build), run, load_config(overrides=[*overrides, f"train.samples_budget={budget}",
                                                                 "train.sanity_steps=0"]), progress=False)
    from audioshard.schedule import AUTO_EPOCHS

    assert metrics["epochs"] == AUTO_EPOCHS[0] == len(history(run))  # 3 < the floor of 5
    assert "epochs = 5" in (run / "config.toml").read_text()  # the resolved number, not 0


@pytest.mark.parametrize("name", ["cnn6", "cnn10", "sepcnn"])
def test_zoo_models_map_a_batch_to_logits_and_cnn10_is_deeper(name):
    from audioshard.models import build_model

    model = build_model({"name": name, "num_classes": 5, "width": 8, "dropout": 0.2}).eval()
    assert model(torch.randn(3, 1, 64, 63)).shape == (3, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1 and m.groups == m.in_channels]
    assert (len(convs), len(depthwise)) == {"cnn6": (4, 0), "cnn10": (8, 0), "sepcnn": (13, 6)}[name]


def test_sepcnn_is_deeper_than_cnn6_with_fewer_weights_and_its_residuals_add_the_input():
    from audioshard.models import SeparableConv, build_model

    def size(name):
        return sum(p.numel() for p in build_model({"name": name, "num_classes": 50, "width": 64, "dropout": 0.2})
                   .parameters())

    assert size("sepcnn") < size("cnn6") / 2  # the point of the factorisation
    same, wider = SeparableConv(4, 4).eval(), SeparableConv(4, 8).eval()
    for layer in (same, wider):
        torch.nn.init.zeros_(layer.layers[3].weight)  # the pointwise conv outputs zeros: BN-ReLU of 0 is relu(bias)=0
    x = torch.randn(2, 4, 6, 5)
    assert torch.allclose(same(x), x) and not wider(x).any()  # a residual only where the shapes match


def test_tensorboard_gets_every_epoch_and_the_confusion_matrix(real_build, tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(str(real_build), run, load_config(overrides=[*TINY_TRAIN, "train.tensorboard=true"]), progress=False)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    for key in ("train/loss", "val/accuracy", "val/clip_macro_f1", "lr"):
        assert [e.step for e in events.Scalars(key)] == [1, 2, 3], key
    assert events.Scalars("val/loss")[-1].value == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert events.Images("val/confusion_matrix")
    assert not (tiny_run[0] / "tensorboard").exists()  # off by default (tiny_run: the same settings without it)


def test_precision_auto_uses_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    """"auto": bfloat16 on CUDA and on CPUs with AMX; a CPU with only AVX512-BF16 or less emulates it (slower:
    float32). The CPU's capabilities are replaced here: the test cannot change the machine it runs on."""
    cpu = torch.device("cpu")
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", torch.device("cuda"))
    assert uses_bf16("auto", torch.device("cuda")) and not uses_bf16("auto", torch.device("mps"))
    for capabilities, expected in [({"amx_bf16": True, "avx512_bf16": True}, True),
                                   ({"amx_bf16": False, "avx512_bf16": True}, False), ({"avx2": True}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda found=capabilities: found)
        assert uses_bf16("auto", cpu) is expected


def test_the_train_step_runs_in_the_precision_asked_for(real_build, tmp_path, capsys):
    """train.precision reaches the train step: bfloat16 autocast changes the arithmetic, so the weights
    after one epoch differ from float32's (same seed, same batches); both train, and the log says which."""
    weights, losses = {}, {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        train(str(real_build), run, load_config(overrides=[*TINY_TRAIN, "train.epochs=1", "train.sanity_steps=0",
                                                           f"train.precision={precision}"]), progress=False)
        weights[precision] = torch.load(run / "last.pt", weights_only=True)["model"]
        losses[precision] = history(run)[0]["train_loss"]
        assert json.loads((run / "metrics.json").read_text())["bf16_autocast"] is (precision == "bf16")
    out = capsys.readouterr().out
    assert "training arithmetic: float32, channels-last (train.precision = fp32)" in out
    assert "training arithmetic: bfloat16 autocast, channels-last (train.precision = bf16)" in out
    assert any(not torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])
    assert all(torch.isfinite(t).all() for t in weights["bf16"].values() if t.is_floating_point())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)  # the same training, rounded otherwise


def test_an_ensemble_trains_its_members_apart_and_predicts_their_mean(real_build, tmp_path):
    """model.members = 2: one checkpoint holds two networks from different random starts; in eval mode its
    logits are their mean, and evaluate, predict and export take it as any other model."""
    from audioshard.checkpoint import read_checkpoint
    from audioshard.export import export_model
    from audioshard.models import build_model

    run = tmp_path / "ensemble"
    overrides = [*TINY_TRAIN, "train.epochs=1", "train.sanity_steps=0", "model.members=2"]  # later settings win
    metrics = train(str(real_build), run, load_config(overrides=overrides), progress=False)
    assert len(history(run)) == 1
    card = read_checkpoint(run / "best_model.pt")
    assert card.model_args["members"] == 2
    one_args = {k: v for k, v in card.model_args.items() if k != "members"}
    members = []
    for i in range(2):  # each member is a whole network of the one-model layout
        prefix = f"members.{i}."
        member = build_model(one_args)
        member.load_state_dict({k[len(prefix):]: v for k, v in card.weights.items() if k.startswith(prefix)})
        members.append(member.eval())
    first = next(iter(members[0].state_dict()))
    assert not torch.equal(members[0].state_dict()[first], members[1].state_dict()[first])  # their own starts
    x = torch.randn(5, 1, 64, 63)
    with torch.no_grad():
        assert torch.allclose(card.model()(x), (members[0](x) + members[1](x)) / 2, atol=1e-5)
    result = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path / "eval")
    assert result["chunk"]["accuracy"] == pytest.approx(metrics["test"]["chunk"]["accuracy"])
    assert export_model(run / "best_model.pt", "torchscript", tmp_path / "m.pt")["parity_max_abs_diff"] <= 1e-4


def test_power_mixing_changes_training_and_is_recorded_while_evaluation_reads_single_recordings(
        real_build, tiny_run, tmp_path):
    """train.mixup_domain = "power": the same seed as tiny_run (log mixup) trains on other inputs from the
    first step on; the run records the setting, and evaluate reproduces the run's own test figure (the
    mixing lives in the training step, not in the data that evaluation reads)."""
    from audioshard.checkpoint import read_checkpoint

    run = tmp_path / "power"
    metrics = train(str(real_build), run, load_config(overrides=[*TINY_TRAIN, "train.mixup_domain=power"]),
                    progress=False)
    assert read_checkpoint(run / "best_model.pt").config["train"]["mixup_domain"] == "power"
    log_losses = [h["train_loss"] for h in history(tiny_run[0])]
    assert all(a != b for a, b in zip([h["train_loss"] for h in history(run)], log_losses, strict=True))
    result = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path / "eval")
    assert result["chunk"]["accuracy"] == pytest.approx(metrics["test"]["chunk"]["accuracy"])


def test_each_member_of_an_ensemble_gets_the_gradient_it_would_get_alone():
    """Members learn apart (a loss each), not as one averaged model, whose members would all get the
    gradient of the mean's error and stop making different mistakes."""
    from audioshard.models import build_model
    from audioshard.schedule import mixed_loss

    torch.manual_seed(0)
    ensemble = build_model({"name": "cnn6", "num_classes": 4, "width": 8, "dropout": 0.0, "members": 2}).train()
    x, y = torch.randn(6, 1, 64, 63), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_loss(ensemble(x), y, y.flip(0), 0.7).backward()
    alone = ensemble.members[1]
    expected = torch.autograd.grad(mixed_loss(alone(x), y, y.flip(0), 0.7) / 2, alone.head.weight)[0]
    assert torch.allclose(alone.head.weight.grad, expected, atol=1e-6)


def test_members_refuse_a_start_from_given_weights_and_forged_counts(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(ConfigError, match="model.members = 2 trains its members from their own random starts"):
        load_config(overrides=["model.members=2", f"model.init_checkpoint={run / 'best_model.pt'}"])
    with pytest.raises(ConfigError, match="model.members"):
        load_config(overrides=["model.members=17"])
    state = torch.load(run / "best_model.pt", weights_only=True)
    state["model_args"]["members"] = 10**6  # would build a million networks before a weight is read
    save_checkpoint(tmp_path / "forged.pt", state)
    with pytest.raises(CheckpointError, match=r"model_args members = 1000000, expected an integer in 1\.\.16"):
        load_checkpoint(tmp_path / "forged.pt")


def test_band_batchnorm_learns_each_bands_level_keeps_absolute_levels_and_travels(real_build, tmp_path):
    """model.input_norm = "bn" (PANNs' bn0 in cnn6): trained on real shards, its running statistics are the
    train data's per-band levels, so low and high bands reach the first convolution on one scale while a
    louder input still reads louder; the checkpoint records n_mels once, evaluation reproduces the run's
    test figure, ONNX export matches, and a checkpoint whose n_mels disagrees with its features is refused."""
    from audioshard.checkpoint import read_checkpoint
    from audioshard.export import export_model

    run = tmp_path / "bn"
    metrics = train(str(real_build), run, load_config(overrides=[*TINY_TRAIN, "train.epochs=1",
                                                                 "model.input_norm=bn"]), progress=False)
    card = read_checkpoint(run / "best_model.pt")
    n_mels = load_manifest(str(real_build)).features.n_mels
    assert card.model_args["n_mels"] == n_mels and card.model_args["input_norm"] == "bn"
    stats = card.weights["bn0.norm.running_mean"]
    assert stats.shape == (n_mels,) and stats.std() > 0.1  # one level per band, learned: not all alike
    model = card.model()
    x = torch.randn(4, 1, n_mels, 63)
    with torch.no_grad():
        assert not torch.allclose(model(x + 2.5), model(x), atol=1e-3)  # absolute level kept (unlike "chunk")
    result = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path / "eval")
    assert result["chunk"]["accuracy"] == pytest.approx(metrics["test"]["chunk"]["accuracy"])
    assert export_model(run / "best_model.pt", "onnx", tmp_path / "m.onnx")["parity_max_abs_diff"] <= 1e-4

    state = load_checkpoint(run / "best_model.pt")
    state["model_args"]["n_mels"] = n_mels + 1  # a layer sized for other features
    save_checkpoint(tmp_path / "forged.pt", state)
    with pytest.raises(CheckpointError, match="n_mels"):
        load_checkpoint(tmp_path / "forged.pt")
    with pytest.raises(ConfigError, match="cnn6, cnn10, sepcnn"):
        load_config(overrides=["model.name=seed_cnn", "model.input_norm=bn"])
