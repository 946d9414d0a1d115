"""The classifiers readout can build by name, and saved classifiers: the registry as data.

A *source* (a small JSON-able dict, recorded in bundles and saved classifiers) says how to rebuild
a classifier's module:

- ``{"builtin": "synthetic-cnn", "num_classes": 6}``: the shipped small classifier's architecture;
- ``{"torchvision": "resnet18", "num_classes": 6}``: any classification model of torchvision
  (``torchvision.models.list_models``), its normalisation, input size and categories read from its
  weight enum, its weights from the torch hub cache or a local file (readout never downloads);
- ``{"import": "my_package.models:build", "kwargs": {...}}``: a callable of the user's that returns
  the module. Such a source is followed only when the caller asks (``allow_import=True``, or the
  module passed in): a file cannot make readout import code.

resnet50 and vgg16 carry the paper's layer names as aliases (``conv3_4`` is resnet50's ``layer2.3``,
vgg16's ``conv4_1`` is ``features.17``) and the paper's default layers; the other models take
:func:`readout.classifier.default_layers`' rule.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

from readout.atomic import atomic_write
from readout.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, LayerDefaults, LrpDefaults
from readout.resources import checkpoint_dir

BUILTIN = "synthetic-cnn"


class SyntheticCNN(nn.Module):
    """The shipped small classifier: a ResNet-shaped CNN of torchvision BasicBlocks (~0.3M parameters).

    Built from torchvision's blocks so that zennit's ResNet canonizer applies to it unchanged.
    Layers: ``relu`` (alias ``conv1``, the stem, stride 2), ``block1`` (stride 2), ``block2``
    (stride 4), ``block3`` (stride 8), ``fc``.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _downsample(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


# ---------------------------------------------------------------------------------------------------------
# Paper names


def resnet_aliases(model: nn.Module) -> dict[str, str]:
    """conv{stage}_{block} -> layer{stage-1}.{block-1} for torchvision ResNets, and fc."""
    aliases = {}
    for stage in range(2, 6):
        for block in range(len(cast(nn.Sequential, model.get_submodule(f"layer{stage - 1}")))):
            aliases[f"conv{stage}_{block + 1}"] = f"layer{stage - 1}.{block}"
    return {**aliases, "fc": "fc"}


def vgg_aliases(model: nn.Module) -> dict[str, str]:
    """conv{block}_{conv} -> features.{i} at a convolution's output (before its ReLU), as the paper and
    the IBA reference code tap VGG; fc -> the last linear layer."""
    aliases: dict[str, str] = {}
    block, conv = 1, 0
    for i, module in enumerate(cast(nn.Sequential, model.get_submodule("features"))):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            conv += 1
            aliases[f"conv{block}_{conv}"] = f"features.{i}"
    head = cast(nn.Sequential, model.get_submodule("classifier"))
    return {**aliases, "fc": f"classifier.{len(head) - 1}"}


# ---------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Entry:
    """What readout knows of a named classifier beyond its module: preprocessing and layer names."""

    build: Callable[[int | None], nn.Module]
    """num_classes (None: the pretrained weights' number) -> the module, randomly initialised."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    classes: tuple[str, ...]
    weights_enum: Any = None
    aliases: Callable[[nn.Module], dict[str, str]] | None = None
    defaults: LayerDefaults | None = None
    source: dict[str, Any] = field(default_factory=dict)


#: The registry's own defaults (layers and LRP rules); every other model takes the rule of
#: readout.classifier.default_layers and readout.lrp.AUTO.
PAPER_DEFAULTS: dict[str, tuple[Callable[[nn.Module], dict[str, str]], LayerDefaults]] = {
    "resnet50": (
        resnet_aliases,
        LayerDefaults(
            "conv3_4",
            "conv2_3",
            ("conv2_3", "conv3_4", "conv4_6", "conv5_3", "fc"),
            LrpDefaults("EpsilonPlusFlat", "resnet"),
        ),
    ),
    "vgg16": (
        vgg_aliases,
        LayerDefaults(
            "conv4_1",
            "conv3_1",
            ("conv3_1", "conv4_1", "conv5_1", "conv5_3", "fc"),
            LrpDefaults("EpsilonPlusFlat", "vgg"),
        ),
    ),
}

_SYNTHETIC = Entry(
    build=lambda num_classes: SyntheticCNN(num_classes or 6),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    input_size=64,
    classes=tuple(str(i) for i in range(6)),
    aliases=lambda model: {
        "conv1": "relu",
        "block1": "block1",
        "block2": "block2",
        "block3": "block3",
        "fc": "fc",
    },
    # block2 for both: chosen on validation images only (configs/eval/synthetic-layer.yaml).
    defaults=LayerDefaults(
        "block2", "block2", ("block1", "block2", "block3", "fc"), LrpDefaults("EpsilonPlusFlat", "resnet")
    ),
    source={"builtin": BUILTIN},
)


def torchvision_names() -> list[str]:
    """Every classification model of torchvision, by name."""
    return sorted(models.list_models(module=models))


def entry(name: str) -> Entry:
    """The registry entry of ``name`` (``synthetic-cnn`` or a torchvision classification model)."""
    if name == BUILTIN:
        return _SYNTHETIC
    if name not in torchvision_names():
        raise KeyError(
            f"unknown classifier {name!r}: neither {BUILTIN!r} nor a torchvision classification model "
            f"({', '.join(torchvision_names())}); a model of your own is given as an import path "
            "'package.module:callable' or passed as a module"
        )
    weights_enum = models.get_model_weights(name)
    default = weights_enum.DEFAULT
    transform = default.transforms()
    aliases, defaults = PAPER_DEFAULTS.get(name, (None, None))
    return Entry(
        build=lambda num_classes: models.get_model(
            name, weights=None, **({"num_classes": num_classes} if num_classes else {})
        ),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        input_size=int(transform.crop_size[0]),
        classes=tuple(default.meta["categories"]),
        weights_enum=weights_enum,
        aliases=aliases,
        defaults=defaults,
        source={"torchvision": name},
    )


def hub_weights(name: str, weights_enum: Any, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weight entry from the torch hub cache; never downloads."""
    # __members__, not getattr: getattr would also accept the enum's methods ("verify") as entries.
    member = weights_enum.__members__.get(weights)
    if member is None:
        valid = ", ".join(weights_enum.__members__)
        raise ValueError(f"unknown weights {weights!r} for {name!r}; valid: {valid}, or null for random init")
    filename = Path(member.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {name!r} ({weights}) are not on this machine and readout never "
            f"downloads them. Put {filename} (from {member.url}) at {cached}, or pass "
            f"weights_path=/path/to/{filename}, or weights=None for random init."
        )
    return torch.load(cached, map_location="cpu", weights_only=True)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (``weights_only=True``: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch reported as a ValueError naming ``what``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{what} does not fit the model: {error}") from error


def import_callable(target: str) -> Callable[..., nn.Module]:
    """``package.module:callable`` -> the callable. Only ever called on the caller's own request."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"an import path is 'package.module:callable', got {target!r}")
    try:
        found = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {target!r}: {error}") from error
    if not callable(found):
        raise ValueError(f"{target!r} is a {type(found).__name__}, not a callable that returns a module")
    return found


_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(name: str) -> bool:
    """``package.module:callable`` (a file path never matches: it has a slash or no colon)."""
    return _IMPORT_PATH.fullmatch(name) is not None


def load_classifier(
    name_or_path: str,
    weights: str | None = "IMAGENET1K_V1",
    weights_path: str | None = None,
    input_size: int | None = None,
    normalisation: Mapping[str, Sequence[float]] | None = None,
    classes: int | Sequence[str] | None = None,
    kwargs: dict[str, Any] | None = None,
    allow_import: bool = False,
) -> Classifier:
    """The frozen classifier in eval mode.

    ``name_or_path``:
    - ``synthetic-cnn``: the shipped classifier (``weights=None``: its architecture, random init);
    - a torchvision model name (``resnet18``, ``convnext_tiny``, ...): ``weights`` names a weight
      enum entry that must already lie in the torch hub cache, or ``weights_path`` gives a local file
      (safetensors or a torch state dict); ``weights=None`` without ``weights_path`` is random init;
    - ``package.module:callable``: your own model, ``callable(**kwargs)`` returning the module
      (imported because you asked for it here); ``weights_path`` optional;
    - the path of a classifier saved by :func:`save_classifier`. One whose source is an import path
      is rebuilt only with ``allow_import=True`` (or use :func:`load_saved_classifier` with ``model=``).

    ``input_size``, ``normalisation`` ({"mean": [3], "std": [3]}) and ``classes`` (names or their
    number) override what the name implies; a model of your own needs them unless it uses
    ImageNet's (224 px, ImageNet normalisation, 1000 classes).
    """
    if is_import_path(name_or_path):
        model = import_callable(name_or_path)(**(kwargs or {}))
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name_or_path!r} returned a {type(model).__name__}, not an nn.Module")
        if weights_path is not None:
            load_state(model, read_state(weights_path), f"weights_path {weights_path}")
        source = {"import": name_or_path, "kwargs": dict(kwargs or {})}
        return _wrap(model, source, name_or_path, input_size, normalisation, classes)
    if name_or_path == BUILTIN and weights is not None and weights_path is None:
        return load_saved_classifier(checkpoint_dir() / f"{BUILTIN}.safetensors")
    if name_or_path == BUILTIN or name_or_path in torchvision_names():
        return _registry_classifier(name_or_path, weights, weights_path, input_size, normalisation, classes)
    path = Path(name_or_path)
    if path.suffix in {".safetensors", ".json"} or path.exists():
        return load_saved_classifier(path, allow_import=allow_import)
    raise KeyError(
        f"unknown classifier {name_or_path!r}: not {BUILTIN!r}, a torchvision classification model, "
        "an import path 'package.module:callable', nor a saved classifier file"
    )


def _registry_classifier(
    name: str,
    weights: str | None,
    weights_path: str | None,
    input_size: int | None,
    normalisation: Mapping[str, Sequence[float]] | None,
    classes: int | Sequence[str] | None,
) -> Classifier:
    spec = entry(name)
    if weights_path is not None and weights is None:
        raise ValueError(
            f"weights=None (random init) contradicts weights_path={weights_path!r} for {name!r}: "
            "drop weights_path for random init, or set weights (e.g. 'IMAGENET1K_V1') to load the file"
        )
    count = classes if isinstance(classes, int) else len(classes) if classes is not None else None
    model = spec.build(count if count != len(spec.classes) else None)
    if weights_path is not None:
        load_state(model, read_state(weights_path), f"weights_path {weights_path}")
    elif weights is not None:
        if spec.weights_enum is None:
            raise ValueError(f"{name!r} has no torchvision weights; weights must be None")
        load_state(model, hub_weights(name, spec.weights_enum, weights), f"the {weights} weights of {name}")
    if classes is None:
        classes = list(spec.classes)
    source = {**spec.source, "num_classes": count or len(spec.classes)}
    return _wrap(model, source, name, input_size or spec.input_size, normalisation, classes, spec)


def _wrap(
    model: nn.Module,
    source: dict[str, Any],
    name: str,
    input_size: int | None,
    normalisation: Mapping[str, Sequence[float]] | None,
    classes: int | Sequence[str] | None,
    spec: Entry | None = None,
) -> Classifier:
    norm = normalisation or {
        "mean": spec.mean if spec else IMAGENET_MEAN,
        "std": spec.std if spec else IMAGENET_STD,
    }
    return Classifier(
        model,
        mean=norm["mean"],
        std=norm["std"],
        input_size=input_size or (spec.input_size if spec else 224),
        classes=classes if classes is not None else 1000,
        name=name,
        aliases=spec.aliases(model) if spec and spec.aliases else None,
        defaults=spec.defaults if spec else None,
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------
# Saved classifiers: safetensors + JSON, never pickle

_META_FORMAT = "readout-classifier/2"
_META_FIELDS = ("source", "classes", "input_size", "normalisation")


def save_classifier(classifier: Classifier, path: str | Path, metadata: dict[str, Any]) -> None:
    """Writes ``path`` (.safetensors, the model's weights) and ``path.json`` (how to rebuild it)."""

    if classifier.source is None:
        raise ValueError(
            f"classifier {classifier.name!r} was built from a module alone and records no way to rebuild "
            "it; build it with load_classifier (a name or an import path) to save it"
        )
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.model.state_dict().items()}
    atomic_write(str(path), save(state))
    meta = {
        "format": _META_FORMAT,
        "name": classifier.name,
        "source": classifier.source,
        "classes": classifier.classes,
        "input_size": classifier.input_size,
        "normalisation": {
            "mean": classifier.mean.flatten().tolist(),
            "std": classifier.std.flatten().tolist(),
        },
        **metadata,
    }
    atomic_write(str(path.with_suffix(".json")), (json.dumps(meta, indent=2) + "\n").encode())


def load_saved_classifier(
    path: str | Path, model: nn.Module | None = None, allow_import: bool = False
) -> Classifier:
    """Loads a classifier written by :func:`save_classifier` (safetensors + JSON, no pickle).

    ``model``: the module to load the weights into, for a classifier of your own; without it a source
    naming an import path is followed only with ``allow_import=True``.
    """
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
    source = meta["source"]
    if model is None:
        model = build_from_source(source, str(meta_path), allow_import)
    classifier = _wrap(
        model,
        source,
        str(meta.get("name", path.stem)),
        int(meta["input_size"]),
        meta["normalisation"],
        meta["classes"],
        _registry_entry(source),
    )
    load_state(classifier.model, load_file(str(path)), str(path))
    return classifier


def _registry_entry(source: dict[str, Any]) -> Entry | None:
    name = source.get("builtin") or source.get("torchvision")
    return entry(name) if name else None


def refuse_import(target: str, where: str, allow_import: bool) -> None:
    """Raises ValueError when ``where`` (a file) names the import path ``target`` and the caller has
    not allowed it: a file never makes readout import code."""
    if is_import_path(target) and not allow_import:
        raise ValueError(
            f"{where} names the import path {target!r} for its classifier. readout never imports code "
            "named in a file: pass the module yourself (classifier=/model=), or allow_import=True "
            "(--allow-import) if you trust the file"
        )


def build_from_source(source: dict[str, Any], where: str, allow_import: bool = False) -> nn.Module:
    """A randomly initialised module from a recorded source; an import path only with ``allow_import``."""
    if "import" in source:
        refuse_import(source["import"], where, allow_import)
        return import_callable(source["import"])(**source.get("kwargs", {}))
    name = source.get("builtin") or source.get("torchvision")
    if not isinstance(name, str):
        raise ValueError(f"{where}: unknown classifier source {source!r}")
    return entry(name).build(source.get("num_classes"))


def _read_classifier_meta(meta_path: Path) -> dict[str, Any]:
    """The JSON beside a saved classifier, checked: its format and its fields."""
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
    if not isinstance(meta["source"], dict):
        raise ValueError(f"{meta_path}: source must be an object, got {meta['source']!r}")
    return meta
