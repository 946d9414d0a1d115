"""Cascading weight randomisation (Adebayo et al., 2018; IBA paper, Sec. 4.3 and App. G.3).

On a deep copy of the classifier, the stages that hold parameters are re-initialised one after the
other, from the last (the logits) down to the first, cumulatively. After each step the attribution is
recomputed with ``attributor_factory(randomised_model)`` for the *original* targets (the original
model's predictions when none are given, held fixed), and compared with the original map: SSIM on
maps normalised by :func:`~readout.metrics.similarity.normalise_map` (uniform 5 x 5 window, as the
paper) and Spearman rank correlation on the raw maps.

Stages: the model's modules in the order they are registered, with every ``nn.Sequential`` opened
into its members (resnet's blocks, vgg's layers); of a readout :class:`~readout.classifier.Classifier`,
those of its ``model``, labelled with the classifier's alias where it has one (``conv5_3``), else
with the module path. A stage is re-initialised by calling ``reset_parameters()`` on every
submodule that has one (the layer's own initialiser; batch norm also resets its running statistics);
a parameter no such call covers is an error. Step ``i`` draws from ``torch.manual_seed(seed + i)``
inside ``torch.random.fork_rng``, so the new weights depend on the seed alone and the global random
state is left as it was.

Step 0 ("original") recomputes the attribution on the unmodified copy: 1 for deterministic
attributors, the noise floor for stochastic ones (e.g. the Per-Sample Bottleneck).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from readout.metrics.aggregate import ImageMeans
from readout.metrics.chunks import resolve_targets
from readout.metrics.similarity import normalise_map, spearman, ssim

Attributor = Callable[..., torch.Tensor]


def _stages(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        found += _stages(child, f"{path}.") if isinstance(child, nn.Sequential) else [(path, child)]
    return found


def stage_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) of the model's stages in execution order (see the module docstring)."""
    inner = getattr(model, "model", None)
    return _stages(inner if hasattr(model, "aliases") and isinstance(inner, nn.Module) else model, "")


def stage_label(model: nn.Module, index: int) -> str:
    """A readable name for stage ``index``: its alias (``fc``, ``conv5_3``) if it has one, else its path."""
    path = stage_list(model)[index][0]
    names = {target: alias for alias, target in getattr(model, "aliases", {}).items()}
    return names.get(path, path)


def parameterised_stages(model: nn.Module) -> list[int]:
    """Indices of the stages that hold parameters, in execution order."""
    return [i for i, (_, stage) in enumerate(stage_list(model)) if any(True for _ in stage.parameters())]


def randomisation_labels(model: nn.Module) -> list[str]:
    """The step labels :func:`cascading_randomisation` yields for ``model`` ("original" first)."""
    return ["original"] + [stage_label(model, index) for index in reversed(parameterised_stages(model))]


def reinitialise(module: nn.Module) -> None:
    """Re-draws every parameter under ``module`` with its layer's ``reset_parameters()``."""
    covered: set[int] = set()
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    missing = [name for name, p in module.named_parameters() if id(p) not in covered]
    if missing:
        raise TypeError(f"no reset_parameters() re-initialises {missing} of {type(module).__name__}")


def cascading_randomisation(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Yields ``("original", copy)``, then ``(stage label, copy)`` with the stages from the last down to
    that one re-initialised. The copy is one deep copy, changed in place between yields; ``model`` is
    never touched. Labels come from :func:`stage_label`."""
    randomised = copy.deepcopy(model)
    yield "original", randomised
    stages = stage_list(randomised)
    cuda = sorted({p.device.index or 0 for p in randomised.parameters() if p.device.type == "cuda"})
    for step, index in enumerate(reversed(parameterised_stages(randomised)), start=1):
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + step)
            reinitialise(stages[index][1])
        yield stage_label(randomised, index), randomised


class RandomisationCurve(NamedTuple):
    """Per-image similarity to the original map after each cumulative randomisation step."""

    labels: list[str]  #: (L + 1,) "original", then the stage re-initialised last at each step
    ssim: torch.Tensor  #: (B, L + 1) SSIM of normalised maps, in [-1, 1]
    spearman: torch.Tensor  #: (B, L + 1) Spearman rank correlation of raw maps, in [-1, 1]


def map_similarity(
    original: torch.Tensor, other: torch.Tensor, window_size: int = 5, sign_invariant: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM (B,), Spearman (B,)) of two maps (B, H, W).

    ``sign_invariant``: the larger of the scores for ``other`` and ``-other`` (the paper does so for
    LRP, whose maps flip sign under randomisation).
    """
    reference = normalise_map(original)
    ssim_value = ssim(reference, normalise_map(other), window_size)
    rank_value = spearman(original, other)
    if sign_invariant:
        ssim_value = torch.maximum(ssim_value, ssim(reference, normalise_map(-other), window_size))
        rank_value = torch.maximum(rank_value, -rank_value)
    return ssim_value, rank_value


def randomisation_curve(
    model: nn.Module,
    images: torch.Tensor,
    attributor_factory: Callable[[nn.Module], Attributor],
    targets: torch.Tensor | None = None,
    seed: int = 0,
    window_size: int = 5,
    sign_invariant: bool = False,
    chunk_size: int = 64,
) -> RandomisationCurve:
    """The cascading randomisation check for one batch.

    images (B, 3, H, W) in [0, 1]; ``attributor_factory(model)`` returns an attributor
    ``(images, target) -> (B, H, W)``; targets (B,) or None for the original model's predictions.
    Calls the attributor L + 2 times (original, step 0, one per parameterised stage).
    """
    targets = resolve_targets(model, images, targets, chunk_size)
    original = attributor_factory(model)(images, targets).detach()
    labels, ssims, ranks = [], [], []
    for label, randomised in cascading_randomisation(model, seed):
        ssim_value, rank_value = map_similarity(
            original, attributor_factory(randomised)(images, targets).detach(), window_size, sign_invariant
        )
        labels.append(label)
        ssims.append(ssim_value)
        ranks.append(rank_value)
    return RandomisationCurve(labels, torch.stack(ssims, dim=1), torch.stack(ranks, dim=1))


class Randomisation(ImageMeans):
    """Mean SSIM and Spearman per randomisation step over batches and ranks.

    ``update(curve)`` with a :class:`RandomisationCurve`; ``compute`` returns
    ``{"ssim": (L + 1,), "spearman": (L + 1,), "count": (L + 1,)}``; ``labels`` names the steps.
    """

    higher_is_better = False

    def __init__(self, labels: list[str], **kwargs: Any) -> None:
        super().__init__(2 * len(labels), **kwargs)
        self.labels = list(labels)

    def update(self, curve: RandomisationCurve) -> None:  # type: ignore[override]
        if curve.labels != self.labels:
            raise ValueError(f"curve steps {curve.labels} differ from the metric's {self.labels}")
        super().update(torch.cat([curve.ssim, curve.spearman], dim=1))

    def compute(self) -> dict[str, torch.Tensor]:
        means, steps = self.means(), len(self.labels)
        return {"ssim": means[:steps], "spearman": means[steps:], "count": self.counts[:steps]}
