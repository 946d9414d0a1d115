"""A trained readout as a self-contained, versioned bundle that loads without Lightning and without pickle.

A bundle is a directory (local or any fsspec URL) with two files:
- ``readout.safetensors``: the readout net's weights and every estimator statistics (no classifier
  weights: the classifier comes from the registry and is checked against a fingerprint);
- ``readout.json``: the configuration (how to rebuild the classifier, its fingerprint, bottleneck
  layer, taps and their module paths, β, σ_s, normalisation, input size) and the format version.

A classifier of your own that the bundle records as an import path is rebuilt from it only with
``load(..., allow_import=True)``; otherwise pass the module (``load(bundle, classifier=model)``), which
is checked against the fingerprint. Loading a bundle never imports code the bundle names.

``python -m readout.export CKPT --out DIR`` writes one from a ``readout.fit`` checkpoint
(:mod:`readout.training.export`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from readout.atomic import atomic_write
from readout.backbones import load_classifier, refuse_import
from readout.classifier import Classifier
from readout.readout_bottleneck import ReadoutBottleneck

FORMAT = "readout-bundle/1"
WEIGHTS_FILE = "readout.safetensors"
CONFIG_FILE = "readout.json"


def classifier_fingerprint(classifier: Classifier | nn.Module) -> str:
    """A short hash of the model's state (names, shapes and values), to refuse a bundle of another one.

    The name is left out: a module passed in by the user matches the registry's with the same weights.
    """
    model = classifier.model if isinstance(classifier, Classifier) else classifier
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def readout_state(attributor: ReadoutBottleneck) -> dict[str, torch.Tensor]:
    """Everything trained or estimated: the attributor's state without the classifier's weights."""
    return {k: v for k, v in attributor.state_dict().items() if not k.startswith("classifier.")}


def export_bundle(
    attributor: ReadoutBottleneck,
    out: str,
    classifier: dict[str, Any],
    beta: float,
    fingerprint: str | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """Writes the bundle to directory ``out``; ``classifier`` holds how to load it (name, weights, path).

    ``training``: how it was trained (``readout.fit`` records its command line, the resolved config,
    the optimiser steps and the minutes), kept in ``readout.json`` for the record; loading ignores it.
    """
    net = attributor.classifier
    config = {
        "format": FORMAT,
        "classifier": {
            **classifier,
            "fingerprint": fingerprint or classifier_fingerprint(net),
            "input_size": net.input_size,
            "normalisation": {"mean": net.mean.flatten().tolist(), "std": net.std.flatten().tolist()},
            "num_classes": net.num_classes,
            "classes": net.classes,
            "source": net.source,
        },
        "layer": attributor.layer,
        "taps": attributor.taps,
        "paths": {
            "layer": net.resolve(attributor.layer),
            "taps": [net.resolve(tap) for tap in attributor.taps],
        },
        "beta": beta,
        "sigma": attributor.bottleneck.sigma,
        "min_std": attributor.statistics.min_std,
        "active_threshold": attributor.statistics.active_threshold,
        "hidden": attributor.hidden,
        **({"training": training} if training is not None else {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in readout_state(attributor).items()}
    # Weights first, config last: a killed export leaves no readout.json, so no bundle that loads half.
    atomic_write(f"{out.rstrip('/')}/{WEIGHTS_FILE}", save_safetensors(state))
    atomic_write(f"{out.rstrip('/')}/{CONFIG_FILE}", json.dumps(config, indent=2, default=str).encode())
    return out


def _read(url: str, name: str) -> bytes:
    path = f"{url.rstrip('/')}/{name}"
    try:
        with fsspec.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} is missing: {url} is not a complete readout bundle") from error


def read_config(path: str | Path) -> dict[str, Any]:
    """A bundle's ``readout.json`` (classifier, fingerprint, layer, taps, β, ...), checked for its format."""
    url = str(path)
    try:
        config = json.loads(_read(url, CONFIG_FILE))
    except json.JSONDecodeError as error:
        raise ValueError(f"{url}/{CONFIG_FILE} is corrupt: {error}") from error
    if config.get("format") != FORMAT:
        raise ValueError(f"{url} is not a readout bundle of format {FORMAT} (found {config.get('format')!r})")
    return config


def load(
    path: str | Path,
    classifier: Classifier | nn.Module | None = None,
    device: str | torch.device = "cpu",
    allow_import: bool = False,
) -> ReadoutBottleneck:
    """Loads a bundle (local directory or fsspec URL) as a ready attributor; imports no Lightning.

    ``classifier``: the classifier the readout was trained on, as a :class:`Classifier` or a plain
    module (wrapped with the bundle's normalisation, input size and classes); it must have the same
    weights (fingerprint), else the bundle is refused. Without it the classifier is rebuilt from the
    bundle's record: a registry name, or an import path only with ``allow_import=True``.
    """
    url = str(path)
    config = read_config(url)
    spec = config["classifier"]
    paths = config.get("paths", {})
    names = dict(
        zip([config["layer"], *config["taps"]], [paths.get("layer"), *paths.get("taps", [])], strict=False)
    )
    if classifier is None:
        classifier = _rebuild(spec, url, allow_import)
        classifier.input_size = spec["input_size"]
    elif not isinstance(classifier, Classifier):
        norm = spec["normalisation"]
        classifier = Classifier(
            classifier,
            mean=norm["mean"],
            std=norm["std"],
            input_size=spec["input_size"],
            classes=spec.get("classes", spec["num_classes"]),
            name=spec.get("name", "custom"),
            aliases={name: p for name, p in names.items() if p is not None and name != p},
            source=spec.get("source"),
        )
    found = classifier_fingerprint(classifier)
    if found != spec["fingerprint"]:
        raise ValueError(
            f"the bundle {url} was trained on classifier {spec['name']!r} with fingerprint "
            f"{spec['fingerprint']}, but the classifier given has fingerprint {found} "
            f"({classifier.name!r}): load the matching weights"
        )
    attributor = ReadoutBottleneck(
        classifier,
        config["layer"],
        config["taps"],
        sigma=config["sigma"],
        min_std=config["min_std"],
        active_threshold=config["active_threshold"],
        hidden=config.get("hidden"),  # absent in bundles written before the option: the paper's
    )
    try:
        state = load_safetensors(_read(url, WEIGHTS_FILE))
    except SafetensorError as error:
        raise ValueError(f"{url}/{WEIGHTS_FILE} is corrupt: {error}") from error
    missing, unexpected = attributor.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(
            f"{url}/{WEIGHTS_FILE} does not fit its config: missing {missing}, unexpected {unexpected}"
        )
    return attributor.to(device).eval()


def _rebuild(spec: dict[str, Any], url: str, allow_import: bool) -> Classifier:
    """The bundle's classifier from its record (see :func:`readout.backbones.load_classifier`)."""
    source = spec.get("source") or {}
    target = str(source.get("import") or spec["name"])
    refuse_import(target, f"the bundle {url}", allow_import)
    return load_classifier(
        target,
        weights=spec.get("weights"),
        weights_path=spec.get("weights_path"),
        input_size=spec["input_size"],
        normalisation=spec["normalisation"],
        classes=spec.get("classes", spec["num_classes"]),
        kwargs=source.get("kwargs"),
    )
