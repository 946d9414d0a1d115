"""Frozen classifiers as flat sequences of stages with taps named in the paper's notation.

Every classifier is flattened into ``stages``: an ``nn.Sequential`` whose modules are the original
model's modules (shared, not copied), in execution order. A tap is the output of one stage, so the
layers before a tap (the prefix) and after it (the suffix) are plain slices of ``stages``. That lets
the Per-Sample and Readout Bottlenecks run the prefix once and only the suffix per step.

Registry keys equal the ``classifier`` values of the configs: ``resnet50``, ``vgg16``, ``synthetic-cnn``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Where the shipped classifier lives: the repository's ``checkpoints/`` unless READOUT_CHECKPOINTS says.
CHECKPOINT_DIR = Path(
    os.environ.get("READOUT_CHECKPOINTS", Path(__file__).resolve().parents[1] / "checkpoints")
)


class Classifier(nn.Module):
    """A frozen classifier: ``forward(images in [0, 1]) -> logits``, normalisation applied inside.

    ``stages`` take *normalised* input. ``taps`` maps a paper-style layer name to the index of the
    stage whose output it is. The module stays in eval mode whatever ``train()`` is asked: its
    batch-norm statistics never change and dropout is never on.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        name: str,
        stages: nn.Sequential,
        taps: dict[str, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        classes: list[str],
    ) -> None:
        super().__init__()
        self.name = name
        self.stages = stages
        self.taps = dict(taps)
        self.input_size = input_size
        self.classes = list(classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Classifier:
        return super().train(False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> normalised input of ``stages``."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.normalize(images))

    def tap_index(self, layer: str) -> int:
        """The stage index of a tap; an unknown name is an error that lists the valid ones."""
        if layer not in self.taps:
            valid = ", ".join(self.taps)
            raise KeyError(f"unknown layer {layer!r} for classifier {self.name!r}; valid layers: {valid}")
        return self.taps[layer]

    def prefix(self, layer: str) -> nn.Sequential:
        """The stages up to and including ``layer``: normalised images -> activation at ``layer``."""
        return self.stages[: self.tap_index(layer) + 1]

    def suffix(self, layer: str) -> nn.Sequential:
        """The stages after ``layer``: activation at ``layer`` -> logits."""
        return self.stages[self.tap_index(layer) + 1 :]


def folded_copy(module: nn.Module, name: str = "the classifier") -> nn.Module:
    """A frozen copy of ``module`` for speed: batch norm folded into the convolutions before it (exact
    in eval mode, up to rounding), weights in channels_last and inputs made so; no weight gradients.
    Where torch.fx cannot trace the module, a warning, and the module itself."""
    try:
        from torch.fx.experimental.optimization import fuse

        folded = fuse(copy.deepcopy(module)).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    except Exception as error:  # a model fx cannot trace runs as it is
        warnings.warn(f"cannot fold batch norm of {name} ({error}); using it unchanged", stacklevel=2)
        return module
    return _ChannelsLast(folded.requires_grad_(False))


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


@dataclass(frozen=True)
class TapInfo:
    """What downstream code needs to size itself from a tap (timm's feature_info, in spirit)."""

    name: str
    index: int
    channels: int
    height: int
    width: int
    stride: int
    spatial: bool
    """False for vector outputs (B, C) such as logits, which readouts broadcast over space."""


def tap_info(classifier: Classifier, layers: list[str], input_size: int | None = None) -> list[TapInfo]:
    """Shapes of the given taps, measured by one forward pass of a zero image."""
    size = input_size or classifier.input_size
    indices = [classifier.tap_index(name) for name in layers]
    shapes: dict[int, torch.Size] = {}
    x = torch.zeros(1, 3, size, size, device=classifier.mean.device)
    with torch.no_grad():
        for i, stage in enumerate(classifier.stages):
            x = stage(x)
            if i in indices:
                shapes[i] = x.shape
    infos = []
    for name, i in zip(layers, indices, strict=True):
        shape = shapes[i]
        spatial = len(shape) == 4
        h, w = (shape[2], shape[3]) if spatial else (1, 1)
        infos.append(TapInfo(name, i, shape[1], h, w, max(1, size // h), spatial))
    return infos


# ---------------------------------------------------------------------------------------------------------
# Architectures: each builder returns (stages, taps) for a model built with the given weights.


def _resnet50_stages(model: models.ResNet) -> tuple[nn.Sequential, dict[str, int]]:
    stages: list[nn.Module] = [model.conv1, model.bn1, model.relu, model.maxpool]
    taps: dict[str, int] = {}
    for stage_number, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4], start=2):
        for block_number, block in enumerate(layer, start=1):
            stages.append(block)
            taps[f"conv{stage_number}_{block_number}"] = len(stages) - 1
    stages += [model.avgpool, nn.Flatten(1), model.fc]
    taps["fc"] = len(stages) - 1
    return nn.Sequential(*stages), taps


def _vgg16_stages(model: models.VGG) -> tuple[nn.Sequential, dict[str, int]]:
    # The paper (and the IBA reference code) tap VGG at a convolution's output, before its ReLU:
    # conv4_1 is features[17].
    stages: list[nn.Module] = list(model.features)
    taps: dict[str, int] = {}
    block, conv = 1, 0
    for i, module in enumerate(stages):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            conv += 1
            taps[f"conv{block}_{conv}"] = i
    stages += [model.avgpool, nn.Flatten(1), *model.classifier]
    taps["fc"] = len(stages) - 1
    return nn.Sequential(*stages), taps


class SyntheticCNN(nn.Module):
    """The shipped small classifier: a ResNet-shaped CNN of torchvision BasicBlocks (~0.3M parameters).

    Built from torchvision's blocks so that zennit's ResNet canonizer applies to it unchanged.
    Taps: ``conv1`` (stem, stride 2), ``block1`` (stride 2), ``block2`` (stride 4), ``block3`` (stride 8),
    ``fc``.
    """

    def __init__(self, num_classes: int = 6, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=False)
        self.block1 = BasicBlock(c1, c1)
        self.block2 = BasicBlock(c1, c2, stride=2, downsample=_downsample(c1, c2))
        self.block3 = BasicBlock(c2, c3, stride=2, downsample=_downsample(c2, c3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def stages(self) -> tuple[nn.Sequential, dict[str, int]]:
        stages = [self.conv1, self.bn1, self.relu, self.block1, self.block2, self.block3]
        stages += [self.avgpool, nn.Flatten(1), self.fc]
        taps = {"conv1": 2, "block1": 3, "block2": 4, "block3": 5, "fc": 8}
        return nn.Sequential(*stages), taps


def _downsample(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


# ---------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: how to build the classifier, its normalisation and its default taps."""

    build: Callable[[Any], tuple[nn.Sequential, dict[str, int]]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    per_sample_layer: str
    readout_layer: str
    readout_taps: tuple[str, ...]
    weights_enum: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _build_resnet50(weights: Any) -> tuple[nn.Sequential, dict[str, int]]:
    return _resnet50_stages(models.resnet50(weights=weights))


def _build_vgg16(weights: Any) -> tuple[nn.Sequential, dict[str, int]]:
    return _vgg16_stages(models.vgg16(weights=weights))


def _build_synthetic(num_classes: Any) -> tuple[nn.Sequential, dict[str, int]]:
    return SyntheticCNN(num_classes=num_classes or 6).stages()


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        build=_build_resnet50,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        per_sample_layer="conv3_4",
        readout_layer="conv2_3",
        readout_taps=("conv2_3", "conv3_4", "conv4_6", "conv5_3", "fc"),
        weights_enum=models.ResNet50_Weights,
    ),
    "vgg16": BackboneSpec(
        build=_build_vgg16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        per_sample_layer="conv4_1",
        readout_layer="conv3_1",
        readout_taps=("conv3_1", "conv4_1", "conv5_1", "conv5_3", "fc"),
        weights_enum=models.VGG16_Weights,
    ),
    "synthetic-cnn": BackboneSpec(
        build=_build_synthetic,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        input_size=64,
        # Chosen as the paper chose its layers, by degradation (grid search), on validation images
        # only (configs/eval/synthetic-layer.yaml, seed 11): deg. 8x8 0.718 at block1, 0.840 at
        # block2, 0.803 at block3 (β = 10/k, 128 images, 2026-12-01).
        per_sample_layer="block2",
        # stride 4, as resnet50's conv2_3 in the paper's readout (Table 4); on validation images
        # (seed 11) the demo readout scored box ratio 0.64 here against 0.47 at block1 (stride 2).
        readout_layer="block2",
        readout_taps=("block1", "block2", "block3", "fc"),
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise KeyError(f"unknown classifier {name!r}; registered: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _imagenet_classes(weights_enum: Any) -> list[str]:
    return list(weights_enum.IMAGENET1K_V1.meta["categories"])


def _resolve_torchvision_weights(
    name: str, spec: BackboneSpec, weights: str | None, weights_path: str | None
):
    """Returns the state dict to load (or None for random init) without ever downloading."""
    if weights is None:
        return None
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights_path {path} for {name!r} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True)
    # __members__, not getattr: getattr would also accept the enum's methods ("verify") as entries.
    entry = spec.weights_enum.__members__.get(weights)
    if entry is None:
        valid = ", ".join(spec.weights_enum.__members__)
        raise ValueError(f"unknown weights {weights!r} for {name!r}; valid: {valid}, or null for random init")
    filename = Path(entry.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {name!r} ({weights}) are not on this machine and readout never "
            f"downloads them. Put {filename} (from {entry.url}) at {cached}, or pass "
            f"weights_path=/path/to/{filename}, or weights=None for random init."
        )
    return torch.load(cached, map_location="cpu", weights_only=True)


def load_classifier(
    name_or_path: str,
    weights: str | None = "IMAGENET1K_V1",
    weights_path: str | None = None,
) -> Classifier:
    """The frozen classifier in eval mode.

    ``name_or_path`` is a registry name (``resnet50``, ``vgg16``, ``synthetic-cnn``) or the path of a
    classifier saved by :func:`save_classifier` (a ``.safetensors`` file with its ``.json`` beside it).
    For the torchvision models, ``weights`` names a weight enum entry that must already lie in the
    torch hub cache (or pass ``weights_path``); ``weights=None`` gives random init for smoke tests.
    ``synthetic-cnn`` loads the weights shipped under ``checkpoints/`` unless ``weights`` is None.
    ``weights_path`` with ``weights=None``, or for a classifier without torchvision weights, is an
    error: the file would otherwise be silently ignored.
    """
    if name_or_path == "synthetic-cnn":
        _check_weights_path(name_or_path, weights, weights_path)
        if weights is None:
            return _assemble("synthetic-cnn", None, num_classes=6)
        return load_saved_classifier(CHECKPOINT_DIR / "synthetic-cnn.safetensors")
    if name_or_path in BACKBONES:
        _check_weights_path(name_or_path, weights, weights_path)
        spec = BACKBONES[name_or_path]
        state = _resolve_torchvision_weights(name_or_path, spec, weights, weights_path)
        classifier = _assemble(name_or_path, None)
        if state is not None:
            classifier.stages.load_state_dict(_to_stage_keys(name_or_path, state))
        return classifier
    path = Path(name_or_path)
    if path.suffix in {".safetensors", ".json"} or path.exists():
        _check_weights_path(name_or_path, weights, weights_path)
        return load_saved_classifier(path)
    raise KeyError(
        f"unknown classifier {name_or_path!r}: not a registered name ({', '.join(BACKBONES)}) nor a file"
    )


def _check_weights_path(name_or_path: str, weights: str | None, weights_path: str | None) -> None:
    """Refuses a ``weights_path`` that :func:`load_classifier` would not load; ``name_or_path`` is known."""
    if weights_path is None:
        return
    spec = BACKBONES.get(name_or_path)
    if spec is None or spec.weights_enum is None:
        takes = ", ".join(name for name, entry in BACKBONES.items() if entry.weights_enum is not None)
        raise ValueError(
            f"weights_path={weights_path!r} was given for {name_or_path!r}, which loads its own weights; "
            f"weights_path is only for {takes}: drop it"
        )
    if weights is None:
        raise ValueError(
            f"weights=None (random init) contradicts weights_path={weights_path!r} for {name_or_path!r}: "
            "drop weights_path for random init, or set weights (e.g. 'IMAGENET1K_V1') to load the file"
        )


def _assemble(
    name: str, weights: Any, num_classes: int | None = None, classes: list[str] | None = None
) -> Classifier:
    spec = backbone_spec(name)
    stages, taps = spec.build(num_classes if name == "synthetic-cnn" else weights)
    if classes is None:
        classes = (
            _imagenet_classes(spec.weights_enum)
            if spec.weights_enum
            else [str(i) for i in range(num_classes or 0)]
        )
    return Classifier(name, stages, taps, spec.mean, spec.std, spec.input_size, classes)


def _to_stage_keys(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps a torchvision state dict onto the flat ``stages`` of the same architecture."""
    reference = {"resnet50": models.resnet50, "vgg16": models.vgg16}[name](weights=None)
    reference.load_state_dict(state)
    stages, _ = _resnet50_stages(reference) if name == "resnet50" else _vgg16_stages(reference)
    return stages.state_dict()


_META_FORMAT = "readout-classifier/1"
_META_FIELDS = ("architecture", "classes", "input_size", "normalisation")


def save_classifier(classifier: Classifier, path: str | Path, metadata: dict[str, Any]) -> None:
    """Writes ``path`` (.safetensors, stage weights) and ``path.json`` (architecture and metadata)."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.stages.state_dict().items()}
    save_file(state, str(path))
    meta = {
        "format": _META_FORMAT,
        "architecture": classifier.name,
        "classes": classifier.classes,
        "input_size": classifier.input_size,
        "normalisation": {
            "mean": classifier.mean.flatten().tolist(),
            "std": classifier.std.flatten().tolist(),
        },
        **metadata,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_saved_classifier(path: str | Path) -> Classifier:
    """Loads a classifier written by :func:`save_classifier` (safetensors + JSON, no pickle)."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    for needed in (path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"classifier file {needed} is missing: a saved classifier is {path.name} with "
                f"{meta_path.name} beside it, as save_classifier writes them"
            )
    meta = _read_classifier_meta(meta_path)
    classifier = _assemble(
        meta["architecture"], None, num_classes=len(meta["classes"]), classes=meta["classes"]
    )
    try:
        classifier.stages.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path} does not match architecture {meta['architecture']!r}: {error}") from error
    norm = meta["normalisation"]
    classifier.mean.copy_(torch.tensor(norm["mean"]).view(1, -1, 1, 1))
    classifier.std.copy_(torch.tensor(norm["std"]).view(1, -1, 1, 1))
    classifier.input_size = int(meta["input_size"])
    return classifier


def _read_classifier_meta(meta_path: Path) -> dict[str, Any]:
    """The JSON beside a saved classifier, checked: its format, its fields and a registered architecture."""
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{meta_path} is not a readout classifier: format {found!r}, expected {_META_FORMAT!r}"
        )
    missing = [name for name in _META_FIELDS if name not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {', '.join(missing)}")
    if meta["architecture"] not in BACKBONES:
        raise ValueError(
            f"{meta_path}: architecture {meta['architecture']!r} is not registered; "
            f"registered: {', '.join(BACKBONES)}"
        )
    return meta
