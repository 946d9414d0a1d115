"""The straightforward Per-Sample Bottleneck, as the published reference code runs it.

One image at a time, the whole classifier on every optimisation step with the bottleneck inserted
by a forward hook, and gradients flowing into the frozen weights as well. It exists to check the
batched implementation (same maps on the same noise) and to measure what batching and caching gain
(``python -m readout.bench per-sample``); do not use it for real work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from readout.bottleneck import information_map
from readout.per_sample import PerSample
from readout.taps import ReplaceOutput


def straightforward_heatmaps(
    attributor: PerSample, images: torch.Tensor, target: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Heatmaps (B, H, W) in bits, fitted image by image; noise is (steps, B, copies, C, h, w)."""
    classifier = attributor.classifier
    classifier.requires_grad_(True)
    try:
        maps = [
            _fit_one(attributor, images[i : i + 1], target[i : i + 1], noise[:, i])
            for i in range(len(images))
        ]
    finally:
        classifier.requires_grad_(False)
        classifier.zero_grad(set_to_none=True)
    return torch.cat(maps)


def _fit_one(
    attributor: PerSample, image: torch.Tensor, target: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    copies = noise.shape[1]
    batch = image.expand(copies, -1, -1, -1)
    alpha = torch.full(
        (1, *attributor.shape),
        attributor.init_alpha,
        device=image.device,
        dtype=image.dtype,
        requires_grad=True,
    )
    optimiser = torch.optim.Adam([alpha], lr=attributor.lr)
    kl_holder: list[torch.Tensor] = []

    def insert(step_noise: torch.Tensor):
        def replace(output: torch.Tensor) -> torch.Tensor:
            z, kl = attributor.bottleneck(output[:1], alpha, step_noise[None])
            kl_holder.append(kl)
            return z

        return replace

    for step in range(attributor.steps):
        kl_holder.clear()
        with ReplaceOutput(classifier=attributor.classifier, layer=attributor.layer, fn=insert(noise[step])):
            logits = attributor.classifier(batch)
        ce = F.cross_entropy(logits, target.expand(copies))
        loss = ce + attributor.beta / attributor.k * kl_holder[0].sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        kl = attributor.bottleneck.information(attributor.features(image), alpha)
    return information_map(kl, tuple(image.shape[-2:]))
