"""Training the Readout Bottleneck with Lightning: the only module besides the data module that imports it.

One training step = one classifier pass without gradients (readout taps and the bottleneck's input),
the readout net, noise injection, and a pass through the layers after the bottleneck only. The
frozen classifier never changes: eval mode, no gradients, and its weights are left out of
checkpoints (they are identified by a fingerprint instead and restored from the registry).
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import fsspec
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torchmetrics.classification import MulticlassAccuracy

from readout.atomic import atomic_write
from readout.attributor import images_of
from readout.backbones import load_classifier
from readout.bundle import classifier_fingerprint
from readout.data.teacher import TeacherMaps
from readout.plotting import heatmap_grid
from readout.readout_bottleneck import ReadoutBottleneck, ReadoutLoss, readout_loss
from readout.training.checkpointing import check_finite
from readout.training.faults import Preemption
from readout.training.settings import check_layers, finite_gradients, lr_factor, sample_noise

CLASSIFIER_PREFIX = "attributor.classifier."


class ReadoutModule(pl.LightningModule):
    """The Readout Bottleneck as a LightningModule. Defaults are the paper's (Table 4).

    Args:
        classifier: the frozen classifier: ``synthetic-cnn``, any torchvision classification model by
            name (resnet50, convnext_tiny, ...), your own as an import path ``package.module:callable``
            (a callable returning the module), or the path of a saved classifier.
        weights: torchvision weight entry for torchvision models (null: random init, smoke tests only).
        weights_path: a local file with the classifier's weights (safetensors or a state dict), instead
            of the torch hub cache.
        input_size: side of the training images (default: the classifier's, 224 for ImageNet models).
        normalisation: ``{mean: [3], std: [3]}`` of the classifier's input (default: the name's, else
            ImageNet's).
        classes: the classifier's class names or their number (default: the name's, else 1000).
        classifier_kwargs: keyword arguments of an import-path callable.
        layer: the bottleneck's layer, a module path or an alias (default: the classifier's, conv2_3
            for resnet50, else the end of the stride-4 stage).
        taps: the readout's layers (default: the classifier's).
        beta: β·k, the numerator of β = beta/k with k = h·w·c of the bottleneck.
        beta_warmup_steps: β ramps linearly from 0 to its value over this many optimiser steps (0:
            the full β from the first step); logged as ``train/beta``. A readout that starts at the
            full β can lose the class before it learns where it is, and collapse (λ → 0).
        lr_warmup_steps: the learning rate ramps linearly from 0 to ``lr`` over this many steps.
        lr_decay: ``cosine``: after the warm-up the learning rate falls along a half cosine to 0 at the
            run's end (Lightning's ``estimated_stepping_batches``); ``none``: it stays at ``lr``.
        distill_weight: weight of the distillation term
            (:func:`readout.readout_bottleneck.distill_loss`): the readout's map of information over
            the bottleneck's locations is pulled towards the Per-Sample map of the same crop
            (``data.teacher``, made by ``python -m readout.tools.teacher``); 0: off, the paper's loss.
            Logged as ``train/distill``; validation losses leave it out.
        sigma: smoothing σ_s of λ.
        lr: Adam's learning rate for the readout net.
        readout_hidden: the readout net's first hidden width (default: the paper's, half the stacked
            tap channels; it dominates the readout's cost).
        min_std: floor of σ in the bottleneck and in the readout's normalisation.
        active_threshold: units non-zero in fewer samples than this share are treated as dead.
        estimate_samples: training samples for μ/σ before the first step (summed over ranks).
        heatmap_every_n_steps: a grid of heatmaps over fixed validation images every N steps (0: off).
        num_heatmaps: images in that grid.
        collapse: what to do when the bottleneck's accuracy falls to chance at validation.
        noise_seed: seed of the per-sample noise.
        nonfinite: what a NaN or Inf loss or gradient does: stop the run (the last checkpoint stays),
            or skip the batch without an optimiser step and count it (``train/nonfinite_skipped``).
        channels_last: keep the frozen classifier and the images in channels_last memory format
            (faster convolutions on GPUs with tensor cores; the same loss up to rounding). The readout
            net runs in channels_last either way.
    """

    def __init__(
        self,
        classifier: str = "resnet50",
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        input_size: int | None = None,
        normalisation: dict[str, list[float]] | None = None,
        classes: int | list[str] | None = None,
        classifier_kwargs: dict[str, Any] | None = None,
        layer: str | None = None,
        taps: list[str] | None = None,
        beta: float = 10.0,
        beta_warmup_steps: int = 0,
        lr_warmup_steps: int = 0,
        lr_decay: Literal["none", "cosine"] = "none",
        distill_weight: float = 0.0,
        sigma: float = 1.0,
        lr: float = 1e-5,
        readout_hidden: int | None = None,
        min_std: float = 0.01,
        active_threshold: float = 0.01,
        estimate_samples: int = 5000,
        heatmap_every_n_steps: int = 500,
        num_heatmaps: int = 8,
        collapse: Literal["warn", "stop", "ignore"] = "warn",
        noise_seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"model.beta must be > 0 (β = beta/k), got {beta}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if beta_warmup_steps < 0 or lr_warmup_steps < 0:
            raise ValueError(
                f"model.beta_warmup_steps and model.lr_warmup_steps must be >= 0, got "
                f"{beta_warmup_steps} and {lr_warmup_steps}"
            )
        if distill_weight < 0:
            raise ValueError(f"model.distill_weight must be >= 0, got {distill_weight}")
        if lr_decay not in ("none", "cosine"):
            raise ValueError(f"model.lr_decay must be 'none' or 'cosine', got {lr_decay!r}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.save_hyperparameters()
        try:
            network = load_classifier(
                classifier,
                weights=weights,
                weights_path=weights_path,
                input_size=input_size,
                normalisation=normalisation,
                classes=classes,
                kwargs=classifier_kwargs,
            )
        except (KeyError, ValueError) as error:
            raise ValueError(f"model.classifier: {error.args[0]}") from error
        network.input_size = input_size or network.input_size
        check_layers(network, layer, taps)
        self.attributor = ReadoutBottleneck(
            network, layer, taps, sigma, min_std, active_threshold, hidden=readout_hidden
        )
        self.fingerprint = classifier_fingerprint(network)
        if channels_last:
            # Lightning's later move to the device keeps the layout (preserve_format); so does Adam's state.
            # The readout net keeps its 1x1 weights contiguous and runs channels_last inside, always.
            self.attributor.classifier.to(memory_format=torch.channels_last)
        classes = network.num_classes
        self.accuracy = MulticlassAccuracy(classes, average="micro")
        self.accuracy_bottleneck = MulticlassAccuracy(classes, average="micro")
        self.fixed_images: torch.Tensor | None = None
        self._step_started = 0.0
        self.nonfinite_skipped = 0
        self._skip_update = False

    # ----------------------------------------------------------------------------------------------------
    # The estimator stage

    def on_fit_start(self) -> None:
        self.check_teacher(getattr(self.trainer.datamodule, "teacher", None))  # type: ignore[attr-defined]
        if self.attributor.statistics.count.item() > 0:
            return  # resumed: the statistics came with the checkpoint
        trainer = self.trainer
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        per_rank = -(-self.hparams["estimate_samples"] // trainer.world_size)
        part = posixpath.join(trainer.default_root_dir, "estimate", f"rank-{trainer.global_rank}.safetensors")
        batches: Iterable[Any] = datamodule.estimate_dataloader()
        done = self.load_partial_estimate(part, per_rank)
        if done:
            rank_zero_info(f"continuing the μ/σ estimate after {done} of {per_rank} samples ({part})")
            batches = skip_samples(batches, done)
        preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)  # type: ignore[attr-defined]
        stop = None if preemption is None else (lambda: preemption.received is not None)
        if self.attributor.estimate(
            batches, max_samples=per_rank, progress=trainer.is_global_zero, stop=stop
        ):
            remove_if_there(part)
            return
        assert preemption is not None
        samples = int(self.attributor.statistics.count.item())
        if samples > done:
            atomic_write(part, self.partial_estimate(per_rank))
        where = f"in the μ/σ estimate after {samples} of {per_rank} samples (kept in {part})"
        preemption.stop_before_training(trainer, where if samples else "before the μ/σ estimate", samples)

    def partial_estimate(self, per_rank: int) -> bytes:
        """The sums of every statistics so far, for :meth:`load_partial_estimate` (safetensors)."""
        tensors = {
            f"{i}.{name}": value.detach().cpu().contiguous()
            for i, statistics in enumerate(self.attributor.all_statistics())
            for name, value in statistics.state_dict().items()
        }
        return save_safetensors(tensors, metadata=self.estimate_identity(per_rank))

    def estimate_identity(self, per_rank: int) -> dict[str, str]:
        """What a part of an estimate must match to be continued: the classifier, the share and ranks."""
        world = str(self.trainer.world_size)
        return {"fingerprint": self.fingerprint, "per_rank": str(per_rank), "world_size": world}

    def load_partial_estimate(self, url: str, per_rank: int) -> int:
        """Loads the part of an estimate a signal stopped (:meth:`partial_estimate`); its samples, or 0
        where there is none, or one of another classifier or number of ranks (then it is ignored)."""
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return 0
        payload = fs.cat_file(path)
        metadata = safe_open_metadata(payload)
        expected = self.estimate_identity(per_rank)
        if metadata != expected:
            rank_zero_warn(
                f"{url} is the part of another estimate ({metadata}, not {expected}): starting over"
            )
            return 0
        tensors = load_safetensors(payload)
        for i, statistics in enumerate(self.attributor.all_statistics()):
            statistics.load_state_dict({name: tensors[f"{i}.{name}"] for name in statistics.state_dict()})
        return int(self.attributor.statistics.count.item())

    def check_teacher(self, teacher: TeacherMaps | None) -> None:
        """Raises ValueError where ``model.distill_weight`` has no teacher, or one of another classifier."""
        if not self.hparams.get("distill_weight", 0.0):
            return
        if teacher is None:
            raise ValueError(
                "model.distill_weight needs teacher maps: set data.teacher to a file made by "
                "python -m readout.tools.teacher on the training shards"
            )
        if teacher.info.fingerprint != self.fingerprint:
            raise ValueError(
                f"data.teacher {teacher.path} was made with classifier {teacher.info.classifier!r} "
                f"(fingerprint {teacher.info.fingerprint}), not the configured "
                f"{self.attributor.classifier.name!r} (fingerprint {self.fingerprint})"
            )

    # ----------------------------------------------------------------------------------------------------
    # Steps

    def configure_optimizers(self) -> Any:
        optimiser = torch.optim.Adam(self.attributor.net.parameters(), lr=self.hparams["lr"])
        warmup = self.hparams.get("lr_warmup_steps", 0)
        cosine = self.hparams.get("lr_decay", "none") == "cosine"
        if not warmup and not cosine:
            return optimiser
        total = max(int(self.trainer.estimated_stepping_batches), 1) if cosine else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: lr_factor(step, warmup, total if cosine else None)
        )
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def current_beta(self) -> float:
        """β·k at this step: ``beta``, ramped linearly from 0 over ``beta_warmup_steps`` steps."""
        warmup = self.hparams.get("beta_warmup_steps", 0)
        ramp = min(1.0, self.global_step / warmup) if warmup else 1.0
        return float(self.hparams["beta"]) * ramp

    def shared_step(self, batch: dict[str, Any]) -> ReadoutLoss:
        """:func:`readout.readout_bottleneck.readout_loss` on a batch, with β of :meth:`current_beta` and
        each sample's noise drawn from its key and the step
        (:func:`readout.training.settings.sample_noise`)."""
        images, labels = batch["image"], batch["label"]
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        keys, step, seed = list(batch["key"]), self.global_step, self.hparams["noise_seed"]
        return readout_loss(
            self.attributor,
            images,
            labels,
            lambda features: sample_noise(keys, step, features, seed),
            self.current_beta(),
            teacher=batch.get("teacher"),
            distill_weight=self.hparams.get("distill_weight", 0.0),
        )

    def on_train_epoch_start(self) -> None:
        # The shard order and crops are seeded per epoch; Lightning only reseeds samplers itself.
        set_epoch = getattr(getattr(self.trainer.train_dataloader, "dataset", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.shared_step(batch)
        # Every rank takes part, so all stop or skip together (a lone skip would leave DDP's others
        # waiting in the gradient all-reduce).
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(out.loss)), all=False):
            self.nonfinite_batch(f"loss is {out.loss.item()} (ce {out.ce.item()}, bits {out.bits.item()})")
            return self.skipped_loss()
        labels = batch["label"]
        size = len(labels)
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/ce": out.ce,
                "train/bits_per_image": out.bits,
                "train/top1": (out.logits.argmax(1) == labels).float().mean(),
                "train/top1_bottleneck": (out.logits_bottleneck.argmax(1) == labels).float().mean(),
                "train/beta": self.current_beta(),
                "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                **({"train/distill": out.distill} if out.distill is not None else {}),
            },
            batch_size=size,
            prog_bar=False,
            sync_dist=False,
        )
        self.log("loss", out.loss, prog_bar=True, batch_size=size, logger=False)
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        size = len(batch["label"]) * self.trainer.world_size
        self.log("train/images_per_s", size / max(elapsed, 1e-9), batch_size=size)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=size)
        every = self.hparams["heatmap_every_n_steps"]
        if every and self.global_step % every == 0 and self.fixed_images is not None:
            self.log_heatmaps()

    def skipped_loss(self) -> torch.Tensor:
        """What a skipped batch returns: 0·Σ parameters, whose gradients are exact zeros.

        Not None: Lightning refuses a ``training_step`` that returns None under DDP, and DDP (without
        ``find_unused_parameters``) expects every rank's backward pass to reach every parameter. The
        zeros are all-reduced like any gradient, then :meth:`on_before_optimizer_step` drops them so
        that Adam's moments and step count stay as they were (the update of an accumulation window
        holding a skipped batch is dropped whole).
        """
        self._skip_update = True
        return torch.stack([p.sum() for p in self.attributor.net.parameters()]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:
            self._skip_update = False
            self.drop_gradients()
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler skips steps with Inf gradients itself
        # After DDP's all-reduce the gradients are the same on every rank: so is this decision.
        if not finite_gradients(self.attributor.net):
            self.nonfinite_batch("a gradient of the readout net is NaN or Inf")
            self.drop_gradients()

    def drop_gradients(self) -> None:
        for parameter in self.attributor.net.parameters():
            parameter.grad = None  # Adam leaves parameters without a gradient untouched

    def nonfinite_batch(self, what: str) -> None:
        """Stops the run (``nonfinite='stop'``) or counts a batch skipped (``'skip'``)."""
        where = f"at step {self.global_step}"
        if self.hparams["nonfinite"] == "stop":
            raise FloatingPointError(
                f"{what} {where}; the run stops and the last checkpoint is kept (no checkpoint ever holds "
                "a NaN). Lower model.lr, check the data, or pass --model.nonfinite skip to skip such batches."
            )
        self.nonfinite_skipped += 1
        rank_zero_warn(f"{what} {where}: batch skipped ({self.nonfinite_skipped} so far)")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.shared_step(batch)
        labels = batch["label"]
        self.accuracy.update(out.logits, labels)
        self.accuracy_bottleneck.update(out.logits_bottleneck, labels)
        self.log_dict(
            {"val/loss": out.loss, "val/ce": out.ce, "val/bits_per_image": out.bits},
            batch_size=len(labels),
            sync_dist=True,
        )
        if batch_idx == 0 and self.fixed_images is None:
            self.fixed_images = batch["image"][: self.hparams["num_heatmaps"]].detach().clone()

    def on_validation_epoch_end(self) -> None:
        clean, noisy = self.accuracy.compute(), self.accuracy_bottleneck.compute()
        self.log_dict({"val/top1": clean, "val/top1_bottleneck": noisy}, sync_dist=False)
        self.accuracy.reset()
        self.accuracy_bottleneck.reset()
        if self.fixed_images is not None:
            self.log_heatmaps()
        if not self.trainer.sanity_checking:
            self.check_collapse(float(clean), float(noisy))

    def check_collapse(self, clean: float, noisy: float) -> None:
        """The readout collapses when β is too large for the lr: λ → 0, accuracy through it → chance."""
        chance = 1.0 / self.attributor.classifier.num_classes
        if (
            self.hparams["collapse"] == "ignore"
            or clean < chance + 0.1
            or noisy > chance + 0.25 * (clean - chance)
        ):
            return  # nothing to judge when the classifier itself is near chance
        message = (
            f"the readout bottleneck has collapsed: top-1 through the bottleneck is {noisy:.3f} against "
            f"{clean:.3f} without it (chance {chance:.3f}). The information penalty wins over the "
            f"classification loss: ramp β up (model.beta_warmup_steps), lower model.beta (configs/demo.yaml "
            f"uses 3 on the synthetic set, not the paper's 10) or model.lr."
        )
        rank_zero_warn(message)
        if self.hparams["collapse"] == "stop":
            self.trainer.should_stop = True

    @torch.no_grad()
    def log_heatmaps(self) -> None:
        experiment: Any = getattr(self.logger, "experiment", None)
        if (
            self.fixed_images is None
            or not hasattr(experiment, "add_image")
            or not self.trainer.is_global_zero
        ):
            return
        heatmaps = self.attributor(self.fixed_images)
        experiment.add_image("heatmaps", heatmap_grid(self.fixed_images, heatmaps), self.global_step)

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints: the frozen classifier is identified, not stored

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # On every rank, before rank 0 writes: a NaN stops all of them instead of reaching the file.
        check_finite(
            checkpoint, f"the checkpoint of step {self.global_step} (not saved; the last one is kept)"
        )
        checkpoint["readout_nonfinite_skipped"] = self.nonfinite_skipped
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(CLASSIFIER_PREFIX)]:
            del state[key]
        checkpoint["readout_classifier"] = {
            "name": self.attributor.classifier.name,
            "fingerprint": self.fingerprint,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        self.nonfinite_skipped = int(checkpoint.get("readout_nonfinite_skipped", 0))
        for key, value in self.attributor.classifier.state_dict().items():
            checkpoint["state_dict"][CLASSIFIER_PREFIX + key] = value

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raises ValueError unless ``checkpoint`` was written by readout.fit for this very classifier."""
        stored = checkpoint.get("readout_classifier")
        if stored is None:
            raise ValueError("this checkpoint was not written by readout.fit (no readout_classifier entry)")
        if stored["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"this checkpoint was trained on classifier {stored['name']!r} (fingerprint "
                f"{stored['fingerprint']}), not on the configured {self.attributor.classifier.name!r} "
                f"(fingerprint {self.fingerprint}): set model.classifier/model.weights to match it"
            )


def skip_samples(batches: Iterable[Any], samples: int) -> Iterator[Any]:
    """The batches after the first ``samples`` images (whole batches: an estimate stops between them)."""
    skipped = 0
    for batch in batches:
        if skipped >= samples:
            yield batch
        else:
            skipped += len(images_of(batch))


def remove_if_there(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def safe_open_metadata(payload: bytes) -> dict[str, str]:
    """The metadata of a safetensors file in memory (its JSON header), without loading its tensors."""
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    return dict(header.get("__metadata__", {}))
