"""Models: a small plain CNN (`seed_cnn`), a stronger default and two PANNs layouts that load published
AudioSet weights, selected by `model.name`.

All take x: (B, 1, n_mels, frames) float32 (normalised log-mel) and return logits (B, num_classes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from audioshard.errors import AudioshardError


def normalize_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-example input normalisation inside the model (so predict and export apply it too).

    "none": as given. "chunk": subtract each example's mean (invariant to recording gain).
    "band": subtract each example's mean per mel band over time, i.e. cepstral mean normalisation:
    a fixed microphone or room colouring is a constant per band in dB, so it cancels.
    "bn" is not per example: it is a learned layer (`BandNorm`), applied by the model after this.
    """
    if mode == "chunk":
        return x - x.mean(dim=(2, 3), keepdim=True)
    if mode == "band":
        return x - x.mean(dim=3, keepdim=True)
    return x


class BandNorm(nn.Module):
    """`model.input_norm = "bn"`: BatchNorm with one channel per mel band (PANNs' `bn0`). Each band is
    scaled to the training data's own mean and spread of that band, learned in training and fixed after,
    so absolute levels are kept (unlike "chunk" and "band"). Why: a 3x3 convolution slides along
    frequency and applies one weight to every band, while the dB levels of low and high bands differ by
    tens of dB; per-band scaling lets the first layer weigh the bands apart."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(n_mels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, n_mels, T): the bands become channels
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class SmallCNN(nn.Module):
    """A small plain CNN: three 3x3 conv layers with ReLU, two max-pools, a global average pool and a
    linear head. Its config name, `seed_cnn`, is kept so that existing configs and checkpoints still load."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.0, input_norm: str = "none"):
        super().__init__()
        self.input_norm = input_norm
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(normalize_input(x, self.input_norm)).flatten(1))


class ConvBlock(nn.Module):
    """`convs` x (conv3x3-BN-ReLU), then 2x2 average pooling: PANNs' CNN6 block (one conv, with a 3x3
    kernel: ~3x cheaper than 5x5) or CNN10 block (two convs: twice the depth, the receptive field of
    a 5x5 with more non-linearity)."""

    def __init__(self, cin: int, cout: int, convs: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(self.layers(x), 2)


class CNN6(nn.Module):
    """A small PANNs-style CNN: four conv-BN-ReLU blocks (width, 2w, 4w, 8w), mean over frequency,
    max + mean over time, dropout, linear head. At width 64 (the config default) its blocks have the
    widths of PANNs' CNN6; width 32 takes about a third of the CPU time."""

    convs_per_block = 1

    def __init__(self, num_classes: int, width: int = 64, dropout: float = 0.2, input_norm: str = "none",
                 n_mels: int = 0):
        super().__init__()
        self.input_norm = input_norm
        self.bn0 = BandNorm(n_mels) if input_norm == "bn" else nn.Identity()  # n_mels: only "bn" needs it
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.blocks = nn.Sequential(*[self.block(i, cin, cout)
                                      for i, (cin, cout) in enumerate(zip([1, *widths[:-1]], widths, strict=True))])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn0(normalize_input(x, self.input_norm))).mean(dim=2)  # (B, C, T): mean over freq.
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, C): strongest and average evidence over time
        return self.head(self.dropout(x))

    def block(self, index: int, cin: int, cout: int) -> nn.Module:
        return ConvBlock(cin, cout, self.convs_per_block)


class CNN10(CNN6):
    """CNN6 with two conv-BN-ReLU layers per block (PANNs' CNN10 layout, at any width): twice the depth
    for more compute than CNN6 at the same width (docs/models.md)."""

    convs_per_block = 2


class SeparableConv(nn.Module):
    """A depthwise 3x3 conv (each channel alone: where in time and frequency) then a pointwise 1x1 conv
    (mixing channels), each followed by BN-ReLU: MobileNet's factorisation of a 3x3 conv, ~8x fewer
    multiply-adds at 128+ channels. The input is added back where the shapes allow (a residual), so
    that a deeper stack still trains from scratch."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.residual = cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class SepCNN(CNN6):
    """CNN6 with each 3x3 conv after the first replaced by two separable convs (`SeparableConv`): seven
    conv layers instead of four, with a third of CNN6's parameters at the same width. The issue's "small
    efficient network": more depth for the compute. The first block stays a plain conv (one input
    channel: nothing to factorise). What it costs and scores: docs/models.md."""

    def block(self, index: int, cin: int, cout: int) -> nn.Module:
        if index == 0:
            return ConvBlock(cin, cout)
        return nn.Sequential(SeparableConv(cin, cout), SeparableConv(cout, cout), nn.AvgPool2d(2))


PANNS_MELS = 64  # every PANNs release: bn0 normalises 64 mel bins


class PannsBlock(nn.Module):
    """PANNs' conv block, with its parameter names (`conv1`, `bn1`[, `conv2`, `bn2`]) so that a PANNs
    state dict loads by name: one 5x5 conv-BN-ReLU (`ConvBlock5x5`, CNN6) or two 3x3 (`ConvBlock`,
    CNN14), then average pooling over `pool` x `pool`."""

    def __init__(self, cin: int, cout: int, kernel: int, convs: int, pool: int):
        super().__init__()
        self.convs, self.pool = convs, pool
        for i in range(1, convs + 1):
            self.add_module(f"conv{i}", nn.Conv2d(cin if i == 1 else cout, cout, kernel, padding=kernel // 2,
                                                  bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.convs + 1):
            x = nn.functional.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return nn.functional.avg_pool2d(x, self.pool) if self.pool > 1 else x


class PannsCNN(nn.Module):
    """The layout of a PANNs network (Kong et al. 2020, github.com/qiuqiangkong/audioset_tagging_cnn,
    pytorch/models.py), layer for layer and name for name, so its AudioSet weights load onto it
    (`model.init_weights`, audioshard.pretrained): `bn0` (BatchNorm over the 64 mel bins), blocks
    `conv_block1..N`, mean over frequency, max + mean over time, `fc1` + ReLU. PANNs' `fc_audioset`
    (527 AudioSet classes) is replaced by `head` (num_classes).

    PANNs convolve (B, 1, time, mel); audioshard's batches are (B, 1, mel, time), so the input is
    transposed first: the pretrained kernels then see time and frequency along the axes they learned.
    Dropout is PANNs' own (0.2 after each block, 0.5 before fc1); `dropout` acts before the head.
    Fixed widths: `width` must be 64 (PANNs' channel counts; it is accepted for the common model_args).
    """

    kernel, convs, widths = 3, 2, (64, 128, 256, 512, 1024, 2048)

    def __init__(self, num_classes: int, width: int = 64, dropout: float = 0.5, input_norm: str = "none"):
        super().__init__()
        if width != 64:
            raise ValueError(f"{type(self).__name__} has PANNs' fixed widths: width must be 64, got {width}")
        self.input_norm = input_norm
        self.bn0 = nn.BatchNorm2d(PANNS_MELS)
        pools = [2] * len(self.widths)
        if self.convs == 2:
            pools[-1] = 1  # CNN14's sixth block does not pool (PANNs: pool_size=(1, 1))
        for i, (cin, cout, pool) in enumerate(zip([1, *self.widths[:-1]], self.widths, pools, strict=True), 1):
            self.add_module(f"conv_block{i}", PannsBlock(cin, cout, self.kernel, self.convs, pool))
        self.fc1 = nn.Linear(self.widths[-1], self.widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 64 mels, frames) -> logits (B, num_classes)."""
        x = normalize_input(x, self.input_norm).transpose(2, 3)  # (B, 1, T, F): PANNs' layout
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # bn0's channels are the mel bins
        for i in range(1, len(self.widths) + 1):
            x = nn.functional.dropout(getattr(self, f"conv_block{i}")(x), 0.2, self.training)
        x = x.mean(dim=3)  # (B, C, T): average over frequency
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, C)
        x = nn.functional.relu(self.fc1(nn.functional.dropout(x, 0.5, self.training)))
        return self.head(self.dropout(x))


class PannsCNN14(PannsCNN):
    """PANNs' CNN14: six blocks of two 3x3 convs (64..2048 channels), fc1 2048 -> 2048; ~80 M parameters.
    Its 16 kHz release (`Cnn14_16k_mAP=0.438.pth`) expects features preset `panns16k`."""


class PannsCNN6(PannsCNN):
    """PANNs' CNN6: four blocks of one 5x5 conv (64..512 channels), fc1 512 -> 512; ~4.8 M parameters.
    Its release (`Cnn6_mAP=0.343.pth`) was trained at 32 kHz: features preset `panns32k`."""

    kernel, convs, widths = 5, 1, (64, 128, 256, 512)


class Ensemble(nn.Module):
    """`model.members` networks of one architecture, each from its own random initialisation, trained side by
    side on the same batches with a loss each (`schedule.mixed_loss` takes their stacked logits), so that each
    learns as it would alone. In eval mode the mean of their logits: one model to predict, evaluate and export.

    Why: members that start apart make different mistakes on recordings none of them heard, and their mean
    makes fewer; it costs `members` times the compute of one."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x) for member in self.members])  # (members, B, C)
        return logits if self.training else logits.mean(0)


MODELS = {"seed_cnn": SmallCNN, "cnn6": CNN6, "cnn10": CNN10, "sepcnn": SepCNN, "panns_cnn14": PannsCNN14,
          "panns_cnn6": PannsCNN6}


def model_args(name: str, num_classes: int, width: int, dropout: float, input_norm: str = "none",
               members: int = 1, n_mels: int = 0) -> dict[str, Any]:
    """The arguments a checkpoint stores to rebuild the model with nothing else (`members` only when above 1,
    `n_mels` only with input_norm "bn", whose layer is sized by it: other checkpoints stay as they were)."""
    if name == "seed_cnn":
        width = 16  # seed_cnn's fixed channel counts (16, 32, 64)
    if name.startswith("panns_"):
        width = 64  # PANNs' channel counts are fixed by the published weights
    args = {"name": name, "num_classes": num_classes, "width": width, "dropout": dropout, "input_norm": input_norm}
    if input_norm == "bn":
        args["n_mels"] = n_mels
    return {**args, "members": members} if members > 1 else args


def build_model(args: dict[str, Any]) -> nn.Module:
    args = dict(args)
    name, members = args.pop("name"), args.pop("members", 1)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if members > 1:
        return Ensemble([MODELS[name](**args) for _ in range(members)])
    return MODELS[name](**args)


def is_head(name: str) -> bool:
    """The classifier layer (named `head` in every model): what a new set of classes replaces."""
    return name == "head" or name.startswith("head.")


def freeze_backbone(model: nn.Module) -> None:
    """Train only the head: every other parameter stops learning and the backbone's BatchNorm layers
    stay in eval mode, keeping the pretrained running statistics (dropout still acts). Call it again
    after every `model.train()`."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_head(name):
            module.eval()


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor of `state` whose name and shape match `model`'s; the rest of `model` (typically
    the head, for other classes) keeps its fresh initialisation. Returns (loaded, kept fresh) names."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(matching), sorted(set(own) - set(matching))


class AdaptError(AudioshardError, ValueError):
    """The model cannot be adapted (no BatchNorm) or too little data was given to adapt it on."""


MIN_ADAPT_EXAMPLES = 20  # fewer give noisy statistics (FSDD: 20 clips of a new speaker ~ as good as 500)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm layer's statistics on unlabelled examples of the data the model is
    about to see (AdaBN: Li et al., "Revisiting batch normalization for practical domain adaptation").

    A new speaker, microphone or site shifts what the first layers see; their normalisation constants
    from training then no longer centre it. Measuring them again on the new recordings (no labels
    needed) re-centres every layer. The examples must be a mix of what will be classified, ideally
    all classes: statistics of one class's recordings alone make that class look like "average" and
    hurt it. Each batch is normalised by its own statistics on the way through (as in training), so
    batches should hold a few dozen examples from several recordings, not one example each.

    Returns:
        how many examples were used. The model is left in eval mode with the new statistics.

    Raises:
        AdaptError: the model has no BatchNorm layer (e.g. seed_cnn), or `batches` was empty.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise AdaptError(f"{type(model).__name__} has no BatchNorm layers: there are no statistics to adapt "
                         "(model.name = \"cnn6\" has them)")
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    model.eval()  # dropout and everything else as at inference
    for m in norms:
        m.reset_running_stats()
        m.train()
    seen = 0
    try:
        for x in batches:
            for m in norms:  # a running average weighted by examples: a short last batch counts for its size
                m.momentum = len(x) / (seen + len(x))
            model(x)
            seen += len(x)
        if seen == 0:
            raise AdaptError("no examples to adapt the BatchNorm statistics on")
    except BaseException:  # the model is left as it was
        for m, (_, mean, var, tracked) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for m, (momentum, *_) in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return seen
