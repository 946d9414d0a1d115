"""What the settings of a training run mean, beside the module that runs it: the layer rules of
``model.layer`` and ``model.taps`` (:func:`check_layers`), the learning-rate schedule
(:func:`lr_factor`), the noise of each sample at each step (:func:`sample_noise`) and the check that
a step's gradients are finite (:func:`finite_gradients`)."""

from __future__ import annotations

import math
import zlib

import torch

from readout.classifier import LOGITS, Classifier


def sample_noise(keys: list[str], step: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise (B, C, h, w), each sample's drawn from (seed, its key, the step).

    The noise of a sample does not depend on which rank or batch position it lands in, so a run on
    two processes draws exactly the noise of a run on one, and a resumed run the noise it would have.
    """
    noise = torch.empty_like(like)
    generator = torch.Generator(device=like.device)
    for i, key in enumerate(keys):
        generator.manual_seed(zlib.crc32(f"{seed}/{key}/{step}".encode()))
        noise[i] = torch.randn(like.shape[1:], generator=generator, device=like.device, dtype=like.dtype)
    return noise


def lr_factor(step: int, warmup: int, total: int | None) -> float:
    """The share of ``lr`` that step ``step`` (0-based) trains at: (step + 1)/warmup during the
    warm-up (no step at lr 0), then 1, or with ``total`` steps in the run a half cosine from 1 down
    to 0 at its end."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def check_layers(network: Classifier, layer: str | None, taps: list[str] | None) -> None:
    """Raises ValueError naming ``model.layer`` or ``model.taps`` and the valid choices.

    The rules (None means the classifier's default, which keeps them):
    - ``model.taps``: at least one layer, each a layer of the classifier (a module path or an alias)
      that runs once, none twice. Taps may lie anywhere, before the bottleneck or after it, the
      classifier's output included: the paper's resnet50 readout sits at conv2_3 and reads conv2_3,
      conv3_4, conv4_6, conv5_3 and the logits.
    - ``model.layer``: a layer of the classifier with a spatial (B, C, h, w) activation, strictly
      before the classifier's output (the layers after it score the noisy activation).
    """
    names = network.layer_names()
    if taps is not None:
        if not taps:
            raise ValueError(
                f"model.taps is empty: name at least one layer of {network.name!r} (null: the "
                f"classifier's default); valid: {', '.join(names)}"
            )
        unknown = [tap for tap in taps if not _is_layer(network, tap)]
        if unknown:
            raise ValueError(
                f"model.taps {unknown} are not layers of {network.name!r}; valid: {', '.join(names)} "
                "or any module path"
            )
        twice = sorted({tap for tap in taps if taps.count(tap) > 1}, key=taps.index)
        if twice:
            raise ValueError(f"model.taps lists {twice} more than once; each layer is read once")
        network.tap_info(taps)  # a tap that runs twice, or gives no tensor, is refused by name
    if layer is None:
        return
    spatial = [name for name in names if name != LOGITS and network.tap_info([name])[0].spatial]
    if not _is_layer(network, layer):
        why = f"is not a layer of {network.name!r}"
    elif network.tap_info([layer])[0].spatial:
        return
    elif network.tap_info([layer])[0].channels == network.num_classes:
        why = "is the classifier's output: the bottleneck must lie strictly before it, with layers after it"
    else:
        why = "has no spatial activation (the bottleneck needs a (B, C, h, w) map)"
    raise ValueError(f"model.layer {layer!r} {why}; valid: {', '.join(spatial)} or any module path")


def _is_layer(network: Classifier, name: str) -> bool:
    try:
        network.resolve(name)
    except KeyError:
        return False
    return True


def finite_gradients(module: torch.nn.Module) -> bool:
    """Whether every gradient of ``module``'s parameters is finite (parameters without one pass)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
