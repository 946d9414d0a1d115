"""The Per-Sample Bottleneck (Schulz et al. 2020, Section 3.2 and Table 3), batched and cached.

B images are fitted together: the layers before the bottleneck run once per image (no gradients),
every optimisation step runs only the layers after it on B × copies noisy activations, and the
classifier's weights never receive gradients. Adam is element-wise and the loss is a sum of
per-image losses, so each image's α follows exactly the path it would follow alone. The layers after
the bottleneck run as a frozen copy with batch norm folded into the convolutions, in channels_last
(``fuse``, the default): the same function of Z up to rounding, cheaper on every step. Under
``precision="bf16"`` those layers run in bf16 autocast (α, Adam, the KL and the map stay fp32), and
``compile=True`` compiles them for the fixed shape of the steps (:mod:`readout.compiled`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from readout.attributor import BottleneckAttributor, Explanation
from readout.bottleneck import LN2, information_map
from readout.classifier import Classifier, as_classifier
from readout.compiled import CompiledModule
from readout.precision import PRECISIONS, Precision, autocast, resolve_precision
from readout.split import folded_copy

log = logging.getLogger(__name__)
_EAGER_LOGGED: set[str] = set()  # classifiers whose hook path was said to run eagerly


class PerSample(BottleneckAttributor):
    """Per-Sample Bottleneck: ``PerSample(classifier, layer=...)(images, target) -> (B, H, W)`` bits.

    Defaults are the paper's (Table 3): α initialised to 5, Adam with lr 1, 10 steps, 10 noise copies,
    β = ``beta``/k with ``beta`` = 10 and k = h·w·c, smoothing σ_s = 1. ``layer`` defaults to the
    classifier's default (``classifier.defaults``: conv3_4 for resnet50, conv4_1 for vgg16, the end
    of the stride-8 stage for a model without registry defaults). ``fuse``: run the layers after the
    bottleneck as :func:`readout.split.folded_copy` (rebuilt when the classifier's weights change in
    place or it moves); False runs the classifier's own modules. Where the classifier cannot be
    split at ``layer`` (:mod:`readout.split`), every step runs the whole classifier with a hook.

    ``precision``: ``bf16`` runs the layers after the bottleneck under bf16 autocast in the fit's
    steps, ``fp32`` does not, ``auto`` (the default) chooses bf16 where the device has it natively
    (:func:`readout.precision.native_bf16`) and logs the choice. ``compile``: compile those layers
    with torch.compile for the steps' shape (split path only; the cost is paid on the first fit of
    each batch shape and logged; a failure falls back to eager with one warning).
    """

    def __init__(
        self,
        classifier: Classifier | nn.Module,
        layer: str | None = None,
        beta: float = 10.0,
        steps: int = 10,
        lr: float = 1.0,
        copies: int = 10,
        sigma: float = 1.0,
        init_alpha: float = 5.0,
        min_std: float = 0.01,
        active_threshold: float = 0.01,
        seed: int | None = None,
        fuse: bool = True,
        precision: Precision = "auto",
        compile: bool = False,
    ) -> None:
        classifier = as_classifier(classifier)
        layer = layer or classifier.defaults.per_sample_layer
        super().__init__(classifier, layer, sigma, min_std, active_threshold)
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (it is the numerator of β = beta/k), got {beta}")
        if steps < 1 or copies < 1:
            raise ValueError(f"steps and copies must be >= 1, got steps={steps}, copies={copies}")
        self.beta, self.steps, self.lr, self.copies, self.init_alpha = beta, steps, lr, copies, init_alpha
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.seed, self.fuse, self.precision = seed, fuse, precision
        self.compile_steps = compile  # not self.compile: that is nn.Module.compile
        self._fitting: tuple[tuple[Any, ...], nn.Module] | None = None
        self._compiled: tuple[nn.Module, CompiledModule] | None = None
        # One generator per device, made on first use: a CPU generator cannot draw CUDA noise, and the
        # attributor is often moved with .to() after construction.
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        """The noise generator on ``device``, seeded with ``seed`` when first used; None without a seed."""
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @property
    def generator(self) -> torch.Generator | None:
        """The noise generator on the classifier's current device (reseed it to repeat a fit's noise)."""
        return self.generator_for(self.classifier.mean.device)

    def fitting_suffix(self, x: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layers after the bottleneck as a fit runs them (see ``fuse``): Z (N, C, h, w) -> logits.

        On the hook path the whole classifier runs on ``x`` (the normalised images, (B, 3, H, W)),
        which must then be given.
        """
        split = self.split
        suffix = split.suffix
        if suffix is None:
            if x is None:
                raise ValueError("on the hook path the fit runs the whole classifier: pass the images")
            return lambda z: split.logits(z, x)
        if not self.fuse:
            return suffix
        tensors = [*suffix.parameters(), *suffix.buffers()]
        # In-place changes bump a tensor's version; .to() makes new tensors: either rebuilds the copy.
        key = tuple((id(t), t._version, t.device, t.dtype) for t in tensors)
        if self._fitting is None or self._fitting[0] != key:
            self._fitting = (key, folded_copy(suffix, f"{self.classifier.name} after {self.layer}"))
        return self._fitting[1]

    def compiled_suffix(
        self, suffix: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``suffix`` compiled (:class:`readout.compiled.CompiledModule`), made once per suffix module;
        a hook-path suffix (no module of its own) stays as it is."""
        if not isinstance(suffix, nn.Module):
            if self.classifier.name not in _EAGER_LOGGED:
                _EAGER_LOGGED.add(self.classifier.name)
                log.info("%s: compile needs the split path; the hook path runs eagerly", self.classifier.name)
            return suffix
        if self._compiled is None or self._compiled[0] is not suffix:
            self._compiled = (suffix, CompiledModule(suffix, f"{self.classifier.name} after {self.layer}"))
        return self._compiled[1]

    def draw_noise(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise (B, copies, C, h, w) for one step, on the device and dtype of ``like``."""
        shape = (batch, self.copies, *self.shape)
        generator = self.generator_for(like.device)
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Sum over images of CE (mean over the copies) + β/k·Σ KL; logits (B·S, K), kl (B, C, h, w) nats."""
        batch = kl.shape[0]
        ce = F.cross_entropy(logits, target.repeat_interleave(self.copies), reduction="none")
        information = kl.flatten(1).sum(1)
        return (ce.view(batch, -1).mean(1) + self.beta / self.k * information).sum()

    def fit(
        self,
        features: torch.Tensor,
        target: torch.Tensor,
        noise: torch.Tensor | None = None,
        suffix: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Optimises α for each image; returns the final α (B, C, h, w).

        ``noise``, when given, is (steps, B, copies, C, h, w) standard normal: the draws per step,
        so that other implementations can be compared on the same noise. ``suffix``: the layers after
        the bottleneck to run (default :meth:`fitting_suffix`).
        """
        if suffix is None:  # not `or`: an nn.Sequential is falsy when empty (it has a __len__)
            suffix = self.fitting_suffix()
        stepped = self.compiled_suffix(suffix) if self.compile_steps else suffix
        precision = resolve_precision(self.precision, features.device)
        alpha = torch.full_like(features, self.init_alpha, requires_grad=True)
        optimiser = torch.optim.Adam([alpha], lr=self.lr)
        for step in range(self.steps):
            step_noise = noise[step] if noise is not None else self.draw_noise(len(features), features)
            z, kl = self.bottleneck(features, alpha, step_noise)
            with autocast(precision, features.device):
                logits = stepped(z)
            loss = self.loss(logits.float(), target, kl)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return alpha.detach()

    def explain(
        self,
        images: torch.Tensor,
        target: torch.Tensor | int | None = None,
        noise: torch.Tensor | None = None,
    ) -> Explanation:
        self.check_images(images)
        features = self.features(images)
        suffix = self.fitting_suffix(self.classifier.normalize(images))
        with torch.no_grad():
            logits = suffix(features)
        target = self.resolve_target(logits, target)
        with torch.enable_grad():
            alpha = self.fit(features, target, noise, suffix)
        with torch.no_grad():
            z, kl = self.bottleneck(features, alpha, self.draw_noise(len(images), features))
            noisy = suffix(z).softmax(1).view(len(images), self.copies, -1).mean(1)
            lam, _ = self.bottleneck.lambdas(alpha)
        return Explanation(
            heatmap=information_map(kl, tuple(images.shape[-2:])),
            information=kl / LN2,
            lam=lam,
            features=features,
            target=target,
            probability=logits.softmax(1).gather(1, target[:, None])[:, 0],
            probability_bottleneck=noisy.gather(1, target[:, None])[:, 0],
        )
