"""Trains the shipped small classifier on the synthetic shapes, measures it on an unseen seed, saves it.

Train (CPU, minutes)::

    python -m readout.tools.train_classifier --out checkpoints/synthetic-cnn \
        --n-train 16000 --epochs 8 --size 64 --seed 0

The 224-px classifier of ``python -m readout.tools.compare_relevance`` starts from the 64-px one::

    python -m readout.tools.train_classifier --out checkpoints/synthetic-cnn-224 \
        --init checkpoints/synthetic-cnn --size 224 \
        --n-train 4000 --epochs 2 --batch-size 64 --lr 1e-3 --n-eval 256 --min-accuracy 0.9

Measure a saved classifier again::

    python -m readout.tools.train_classifier --evaluate-only --out checkpoints/synthetic-cnn \
        --n-eval 512 --eval-seed 1000

The training images are made in memory by :func:`readout.data.synthetic.generate` (seed ``--seed``); the
test images use ``--eval-seed``, a seed never used for training, so none of them was seen. The weights
and a JSON with the architecture, classes, input size, normalisation, both commands, the measured top-1
and the training time are written by :func:`readout.backbones.save_classifier`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from readout.backbones import load_classifier, load_saved_classifier, save_classifier
from readout.classifier import Classifier
from readout.data.synthetic import CLASSES, generate, synthetic_batch


@dataclass(frozen=True)
class TrainConfig:
    """What ``python -m readout.tools.train_classifier`` trains; every field is a flag (``--n-train``)."""

    architecture: str = "synthetic-cnn"
    """``synthetic-cnn`` or any torchvision classification model (``resnet18``), randomly initialised
    with one output per synthetic class and the normalisation of its name."""
    out: str = "checkpoints/synthetic-cnn"
    """Path of the classifier without suffix: ``.safetensors`` and ``.json`` are written."""
    n_train: int = 16000
    """Training images, samples 0 .. n_train - 1 of ``seed``."""
    epochs: int = 8
    size: int = 64
    """Image side in pixels."""
    seed: int = 0
    """Data seed of the training images and seed of the initialisation and batch order."""
    batch_size: int = 128
    lr: float = 3e-3
    """Peak learning rate of AdamW under a one-cycle schedule."""
    weight_decay: float = 1e-4
    n_eval: int = 512
    """Test images, made with ``eval_seed``."""
    eval_seed: int = 1000
    """Data seed of the test images; never used for training."""
    init: str = ""
    """A saved classifier to start from (its weights; e.g. the 64-px one for a 224-px fine-tune)."""


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations per image: every class is invariant to them. (B, 3, H, W)."""
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    turn = torch.rand(b, generator=generator) < 0.5
    return torch.where(turn[:, None, None, None], images.transpose(-1, -2), images)


def train(config: TrainConfig, log: bool = True) -> tuple[Classifier, dict[str, float]]:
    """Trains ``config.architecture``; returns the frozen classifier and the wall-clock and CPU seconds
    it took.

    CPU seconds are summed over threads; on a machine shared with other jobs the wall clock grows with
    the load while the CPU seconds stay about the same.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    began, cpu_began = time.perf_counter(), time.process_time()
    samples = list(generate(config.n_train, config.size, config.seed))
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()  # uint8
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    del samples
    if log:
        print(f"made {len(labels)} training images in {time.perf_counter() - began:.0f} s", flush=True)
    classifier = load_classifier(
        config.architecture, weights=None, input_size=config.size, classes=list(CLASSES)
    )
    model = classifier.model
    if config.init:
        model.load_state_dict(load_saved_classifier(Path(config.init)).model.state_dict())
    steps_per_epoch = len(labels) // config.batch_size
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    model.train()  # the module itself: the Classifier around it stays in eval mode
    for epoch in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        correct, seen, loss_sum = 0, 0, 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = _augment(images[index].float().div_(255.0), generator)
            logits = model(classifier.normalize(x))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
            seen += len(index)
            loss_sum += float(loss.detach()) * len(index)
        if log:
            print(
                f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.3f}, "
                f"train top-1 {correct / seen:.3f}, {time.perf_counter() - began:.0f} s",
                flush=True,
            )
    model.requires_grad_(False)
    classifier.eval()
    timing = {"seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began}
    return classifier, {name: round(value, 1) for name, value in timing.items()}


@torch.no_grad()
def evaluate(classifier: Classifier, n: int, size: int, seed: int, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] on synthetic samples 0 .. n - 1 of ``seed``."""
    correct = 0
    for start in range(0, n, batch_size):
        batch = synthetic_batch(min(batch_size, n - start), size, seed, start)
        correct += int((classifier(batch["image"]).argmax(1) == batch["label"]).sum())
    return correct / n


def evaluate_command(config: TrainConfig) -> str:
    return (
        f"python -m readout.tools.train_classifier --evaluate-only --out {config.out} "
        f"--n-eval {config.n_eval} --eval-seed {config.eval_seed} --size {config.size}"
    )


def main(argv: list[str] | None = None) -> float:
    """Runs the CLI; returns the measured top-1 in [0, 1] (and exits 1 below ``--min-accuracy``)."""
    parser = argparse.ArgumentParser(
        prog="python -m readout.tools.train_classifier", description=__doc__.split("\n")[0]
    )
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--evaluate-only", action="store_true", help="measure the saved classifier at --out")
    parser.add_argument(
        "--min-accuracy", type=float, default=0.95, help="exit with status 1 below this top-1"
    )
    args = parser.parse_args(argv)
    config = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    if args.evaluate_only:
        classifier = load_saved_classifier(Path(config.out))
    else:
        classifier, timing = train(config)
    accuracy = evaluate(classifier, config.n_eval, config.size, config.eval_seed)
    print(f"top-1 {accuracy:.4f} on {config.n_eval} images of seed {config.eval_seed}")
    if not args.evaluate_only:
        command = "python -m readout.tools.train_classifier " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        metadata = {
            "training": {
                **asdict(config),
                "command": command,
                **timing,
                "optimizer": "AdamW, one-cycle schedule, cross-entropy",
                "augmentation": "random horizontal flips and transposes",
                "data": "readout.data.synthetic.generate(n_train, size, seed)",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "evaluation": {
                "top1": accuracy,
                "n": config.n_eval,
                "seed": config.eval_seed,
                "size": config.size,
                "command": evaluate_command(config),
            },
        }
        save_classifier(classifier, config.out, metadata)
        print(f"saved {config.out}.safetensors and .json; training took {timing}")
    if accuracy < args.min_accuracy:
        sys.exit(1)
    return accuracy


if __name__ == "__main__":
    main()
