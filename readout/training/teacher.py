"""Per-Sample maps of the training images: the teacher of a distilled readout.

Made by ``python -m readout.tools.teacher`` (or ``python -m readout.tools.demo --teacher FILE``)::

    python -m readout.tools.teacher --classifier synthetic-cnn --shards data/synthetic/train \
        --layer block2 --out data/synthetic/train-teacher.safetensors

Each training image is fitted by the Per-Sample Bottleneck (the paper's settings, β = ``--beta``/k,
for its label) and its information map, summed over channels (bits per bottleneck location,
(h, w)), is stored under the sample's key. ``readout.fit`` reads the file with ``--data.teacher``,
carries each map through the same random crop and flip as its image, and ``--model.distill_weight``
adds a term that pulls the readout's map towards it (:func:`readout.readout_bottleneck.distill_loss`).

The images are fitted whole, resized to the classifier's input size (the synthetic set's are that
size already), so a map covers the canvas its image's crops are drawn from. Work is written in
chunks under ``<out>.partial/``: a run stopped part-way resumes at the first chunk not written, and
the file appears, whole, only at the end. The file is safetensors (no code runs on loading): one
float16 tensor ``maps`` (N, h, w) and, in its metadata, the keys and how the maps were made.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torchvision.transforms import v2
from tqdm.auto import tqdm

from readout.atomic import atomic_write
from readout.backbones import load_classifier
from readout.bundle import classifier_fingerprint
from readout.data.shards import ShardDataset, make_loader, resolve_shards
from readout.data.teacher import FORMAT
from readout.per_sample import PerSample


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher maps are made (the flags of ``python -m readout.tools.teacher``)."""

    shards: str
    """The training shards (as ``data.train_shards``)."""
    layer: str
    """The Per-Sample layer (the readout's, usually)."""
    out: str
    """The teacher file (safetensors)."""
    classifier: str = "synthetic-cnn"
    weights: str | None = "IMAGENET1K_V1"
    weights_path: str | None = None
    beta: float = 10.0
    """β·k of the Per-Sample fit."""
    batch_size: int = 64
    estimate_samples: int = 2000
    """Training images for μ/σ."""
    seed: int = 0
    """Seed of the fit's noise."""
    threads: int = 0
    """Torch threads (0: torch's default)."""


def teacher_settings(args: TeacherConfig, fingerprint: str) -> dict[str, str]:
    """What the maps depend on: recorded in the file and in the chunks' folder, checked on resuming."""
    return {
        "format": FORMAT,
        "classifier": args.classifier,
        "fingerprint": fingerprint,
        "layer": args.layer,
        "beta": str(args.beta),
        "seed": str(args.seed),
        "shards": str(args.shards),
        "estimate_samples": str(args.estimate_samples),
    }


def compute(args: TeacherConfig) -> Path:
    """Fits every training image, chunk by chunk; returns the teacher file."""
    out = Path(args.out)
    classifier = load_classifier(args.classifier, weights=args.weights, weights_path=args.weights_path)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = teacher_settings(args, classifier_fingerprint(classifier))
    partial = Path(f"{out}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    recorded = partial / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise ValueError(
            f"{partial} holds chunks made with other settings ({recorded}); remove it, or give the "
            "settings it was started with"
        )
    atomic_write(str(recorded), (json.dumps(settings, indent=2) + "\n").encode())

    size = classifier.input_size
    transform = v2.Compose([v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    shards = resolve_shards(args.shards)
    attributor = PerSample(classifier, layer=args.layer, beta=args.beta, seed=args.seed)
    statistics = partial / "statistics.safetensors"
    if statistics.exists():
        attributor.statistics.load_state_dict(load_file(statistics))
    else:
        loader = make_loader(shards, "eval", args.batch_size, 0, transform=transform)
        attributor.estimate(loader, max_samples=args.estimate_samples)
        state = {k: v.contiguous() for k, v in attributor.statistics.state_dict().items()}
        atomic_write(str(statistics), save(state))

    loader = make_loader(shards, "eval", args.batch_size, 0, transform=transform)
    dataset = loader.dataset
    assert isinstance(dataset, ShardDataset)
    chunks: list[Path] = []
    bar = tqdm(total=shards.total_samples, desc="teacher maps", unit="img")
    for index, batch in enumerate(loader):
        chunk = partial / f"chunk-{index:06d}.safetensors"
        chunks.append(chunk)
        if not chunk.exists():
            with torch.no_grad():
                # noise seeded per chunk, so that a resumed run draws what an uninterrupted one would
                generator = attributor.generator
                assert generator is not None
                generator.manual_seed(args.seed + index)
                explanation = attributor.explain(batch["image"], target=batch["label"])
            maps = explanation.information.sum(1).to(torch.float16).contiguous()
            atomic_write(str(chunk), save({"maps": maps}, metadata={"keys": json.dumps(list(batch["key"]))}))
        bar.update(len(batch["key"]))
    bar.close()
    if dataset.health().bad:
        print(f"skipped as unreadable (no map): {dataset.health().reasons}")

    keys: list[str] = []
    parts: list[torch.Tensor] = []
    for chunk in chunks:
        with safe_open(str(chunk), framework="pt") as handle:
            keys += json.loads((handle.metadata() or {})["keys"])
            parts.append(handle.get_tensor("maps"))
    if len(set(keys)) != len(keys):
        raise ValueError(f"the shards {args.shards} hold a key more than once: maps cannot be looked up")
    atomic_write(str(out), save({"maps": torch.cat(parts)}, metadata={**settings, "keys": json.dumps(keys)}))
    shutil.rmtree(partial)
    return out
