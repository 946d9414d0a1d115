"""readout.training.module: the training loss against a slow re-implementation, the two passes
of a training step, channels_last, the layer rules, and what a run writes to TensorBoard.

Random-init synthetic-cnn at 32 px (the ``tiny_shards`` of conftest.py): each test takes a few seconds.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import fit_with_tensorboard, tiny_config
from torch import nn

from readout.backbones import load_classifier
from readout.classifier import Classifier
from readout.taps import FeatureTaps, ReplaceOutput
from readout.training.datamodule import ReadoutDataModule
from readout.training.module import ReadoutModule
from readout.training.settings import check_layers, lr_factor

SIZE = 32  # conftest.TINY_SHARDS


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_module(**kwargs: Any) -> ReadoutModule:
    """A random-init synthetic-cnn readout at 32 px, μ/σ estimated on 16 random images (seed 0)."""
    torch.manual_seed(0)
    arguments: dict[str, Any] = {
        "classifier": "synthetic-cnn",
        "weights": None,
        "input_size": SIZE,
        "estimate_samples": 16,
        "heatmap_every_n_steps": 0,
        **kwargs,
    }
    module = ReadoutModule(**arguments)
    module.attributor.estimate([torch.rand(16, 3, SIZE, SIZE)], progress=False)
    return module


def tiny_batch(size: int = 3, seed: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(size, 3, SIZE, SIZE, generator=generator),
        "label": torch.randint(0, 6, (size,), generator=generator),
        "key": [f"sample-{i}" for i in range(size)],
    }


# ------------------------------------------------------------------------------------------------------
# The loss, the slow way


def reference_loss(
    module: ReadoutModule, batch: dict[str, Any], step: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample at a time, through the whole classifier with the bottleneck's layer replaced:
    CE(label) + β/k·Σ KL per sample (paper eq. 5 for the KL, eq. 2 for Z), then the mean over the
    batch. Returns (loss, CE), both means over the batch."""
    attributor, hparams = module.attributor, module.hparams
    classifier, statistics = attributor.classifier, attributor.statistics
    mean, std, active = statistics.mean, statistics.std, statistics.active
    losses, ces = [], []
    for i, key in enumerate(batch["key"]):
        image, label = batch["image"][i : i + 1], int(batch["label"][i])
        with torch.no_grad(), FeatureTaps(classifier, [attributor.layer, *attributor.taps]) as taps:
            classifier(image)
        r = taps.features[attributor.layer]
        alpha = attributor.alpha([taps.features[name] for name in attributor.taps])
        lam, one_minus = attributor.bottleneck.lambdas(alpha)
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"{hparams['noise_seed']}/{key}/{step}".encode())
        )
        noise = torch.randn(r.shape[1:], generator=generator)
        z = (lam * r + one_minus * (mean + std * noise)) * active
        normalised = (r - mean) / std
        kl = -0.5 * (1 + torch.log(one_minus**2) - (lam * normalised) ** 2 - one_minus**2) * active
        with ReplaceOutput(classifier, attributor.layer, lambda output, z=z: z):
            logits = classifier(image)
        ce = -torch.log_softmax(logits[0], 0)[label]
        losses.append(ce + hparams["beta"] / attributor.k * kl.sum())
        ces.append(ce)
    return torch.stack(losses).mean(), torch.stack(ces).mean()


def test_the_training_loss_is_ce_plus_beta_over_k_times_the_kl_per_sample_mean_over_the_batch():
    module = tiny_module(beta=3.0)
    last = module.attributor.net.layers[-1]
    nn.init.normal_(last.weight, std=0.5)  # α varies over space and samples, not 5 everywhere
    batch = tiny_batch()
    out = module.shared_step(batch)
    loss, ce = reference_loss(module, batch)
    torch.testing.assert_close(out.ce, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert out.loss.item() > 1.5 * out.ce.item()  # the KL term counts
    assert out.ce.item() != pytest.approx(reference_loss(module, batch, step=1)[1].item(), abs=1e-5)
    # the loss trains the readout net
    out.loss.backward()
    assert last.weight.grad is not None and bool(last.weight.grad.abs().sum() > 0)


def leaf_calls_expected(attributor: Any) -> tuple[dict[str, nn.Module], str]:
    """The model's leaf modules by path, and the first leaf after the bottleneck's layer."""
    model, cut = attributor.classifier.model, attributor.classifier.resolve(attributor.layer)
    names = [name for name, _ in model.named_children()]
    after = names[names.index(cut) + 1]
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    first = next(name for name in leaves if name.split(".")[0] == after)
    return leaves, first


class CountForwards(pl.Callback):
    """During training steps only: calls of every leaf module of the classifier, and the input of the
    first leaf after the bottleneck on each call, next to the bottleneck's output."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.suffix_inputs: list[torch.Tensor] = []
        self.noisy: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        attributor = pl_module.attributor
        leaves, first = leaf_calls_expected(attributor)
        for name, leaf in leaves.items():
            self.handles.append(leaf.register_forward_hook(lambda *a, n=name: self.calls.update([n])))
        self.handles.append(
            leaves[first].register_forward_pre_hook(
                lambda module, inputs: self.suffix_inputs.append(inputs[0].detach().clone())
            )
        )
        self.handles.append(
            attributor.bottleneck.register_forward_hook(
                lambda module, inputs, output: self.noisy.append(output[0].detach().clone())
            )
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def test_a_training_step_runs_the_prefix_once_and_only_the_suffix_with_the_bottleneck(tiny_shards):
    module = tiny_module(estimate_samples=8)
    data = ReadoutDataModule(
        tiny_shards, batch_size=4, num_workers=0, image_size=SIZE, resize=SIZE, batches_per_epoch=1,
        pin_memory=False,
    )  # fmt: skip
    counter = CountForwards()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[counter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    # the first pass runs every leaf once (a block's shared ReLU twice), the second only those after it
    classifier = module.attributor.classifier
    once = Counter()
    handles = [
        m.register_forward_hook(lambda *a, n=n: once.update([n]))
        for n, m in leaf_calls_expected(module.attributor)[0].items()
    ]
    classifier(torch.rand(1, 3, SIZE, SIZE))
    for handle in handles:
        handle.remove()
    cut = classifier.resolve(module.attributor.layer)
    names = [name for name, _ in classifier.model.named_children()]
    after = set(names[names.index(cut) + 1 :])
    assert counter.calls == Counter({n: c * (2 if n.split(".")[0] in after else 1) for n, c in once.items()})
    # the first pass feeds the suffix the clean activation, the second the bottleneck's Z
    clean, noisy = counter.suffix_inputs
    assert torch.equal(noisy, counter.noisy[0]) and not torch.allclose(clean, noisy)


# ------------------------------------------------------------------------------------------------------
# channels_last


def one_step(channels_last: bool) -> tuple[float, float, ReadoutModule]:
    """The loss of a batch, one Adam step on it, and the loss after: (before, after, module)."""
    module = tiny_module(beta=10.0, lr=1e-2, channels_last=channels_last)
    nn.init.normal_(module.attributor.net.layers[-1].weight, std=0.1)
    optimizer = module.configure_optimizers()
    batch = tiny_batch(4)
    loss = module.shared_step(batch).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = module.shared_step(batch).loss
    return loss.item(), after.item(), module


def test_channels_last_gives_the_loss_of_the_default_layout():
    before, after, plain = one_step(channels_last=False)
    before_cl, after_cl, module = one_step(channels_last=True)
    stem = module.attributor.classifier.model.conv1.weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    _, features, _ = module.attributor.first_pass(
        tiny_batch(2)["image"].contiguous(memory_format=torch.channels_last)
    )
    assert features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
    assert after != pytest.approx(before, rel=1e-4)  # the step changed something
    assert before_cl == pytest.approx(before, rel=1e-5)
    assert after_cl == pytest.approx(after, rel=1e-5)
    assert module.fingerprint == plain.fingerprint  # the layout is not part of the classifier's identity


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_readout_gradients_have_the_strides_of_their_parameters(channels_last):
    # DDP's gradient buckets are views with each parameter's strides; a gradient with other strides
    # (a channels_last one of a 1x1 weight, say) is copied at every step with a warning. oneDNN returns
    # such gradients for channels_last inputs when it runs on more than one thread.
    torch.set_num_threads(2)  # the autouse fixture restores the count
    module = tiny_module(beta=10.0, lr=1e-2, channels_last=channels_last)
    nn.init.normal_(module.attributor.net.layers[-1].weight, std=0.1)
    module.shared_step(tiny_batch(2)).loss.backward()
    for name, parameter in module.attributor.net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
        assert parameter.grad.stride() == parameter.stride(), name


# ------------------------------------------------------------------------------------------------------
# Layer rules


def toy_classifier() -> Classifier:
    """conv (spatial) -> flat (a vector, not the output) -> fc (the output)."""
    stages = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(1), nn.Linear(4 * 8 * 8, 2))
    aliases = {"conv": "0", "flat": "1", "fc": "2"}
    return Classifier(stages, (0.5,) * 3, (0.25,) * 3, 8, ["a", "b"], name="toy", aliases=aliases)


@pytest.mark.parametrize(
    ("layer", "taps", "expected"),
    [
        (None, ["conv", "head"], r"model\.taps \['head'\] are not layers of 'toy'; valid: conv, flat, fc"),
        (None, ["conv", "fc", "conv", "fc"], r"model\.taps lists \['conv', 'fc'\] more than once"),
        (None, [], r"model\.taps is empty: name at least one layer of 'toy'.*valid: conv, flat, fc"),
        (
            "fc",
            None,
            r"model\.layer 'fc' is the classifier's output: .*strictly before it.*; valid: conv or any"
            r" module path$",
        ),
        ("flat", None, r"model\.layer 'flat' has no spatial activation .*; valid: conv or any module path$"),
        ("conv9", None, r"model\.layer 'conv9' is not a layer of 'toy'; valid: conv or any module path$"),
    ],
    ids=["unknown-tap", "tap-twice", "no-taps", "output", "not-spatial", "unknown-layer"],
)
def test_each_layer_rule_names_its_field_and_the_valid_choices(layer, taps, expected):
    with pytest.raises(ValueError, match=expected):
        check_layers(toy_classifier(), layer, taps)


def test_taps_may_lie_after_the_bottleneck_the_output_included():
    """As in the paper: the bottleneck at conv2_3 and the readout reading conv2_3 ... fc."""
    check_layers(toy_classifier(), "conv", ["conv", "flat", "fc"])
    network = load_classifier("synthetic-cnn", weights=None)
    check_layers(network, "block1", ["block3", "fc"])
    check_layers(network, "block2", None)


# ------------------------------------------------------------------------------------------------------
# TensorBoard


def test_beta_and_lr_warm_up_linearly_and_beta_is_logged(tiny_shards, tmp_path, monkeypatch):
    config = tiny_config(tiny_shards, max_steps=5, limit_val_batches=0)
    config["model"].update(beta=8.0, beta_warmup_steps=4, lr_warmup_steps=2)
    cli, events = fit_with_tensorboard(config, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 5
    # Logged after each step: β of the step that ran (0, 2, 4, 6, then the full 8).
    assert [e.value for e in events.Scalars("train/beta")] == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0])
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3)


def test_cosine_decay_follows_the_warm_up_down_to_zero():
    assert [lr_factor(step, 2, None) for step in range(4)] == [0.5, 1.0, 1.0, 1.0]
    factors = [lr_factor(step, 2, 10) for step in range(12)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a > b for a, b in zip(factors[2:10], factors[3:10], strict=False))
    assert factors[6] == pytest.approx(0.5) and factors[10] == factors[11] == pytest.approx(0.0)


def test_cosine_decay_reaches_the_optimiser(tiny_shards, tmp_path, monkeypatch):
    config = tiny_config(tiny_shards, max_steps=4, limit_val_batches=0)
    config["model"].update(lr_decay="cosine")
    _, events = fit_with_tensorboard(config, tmp_path, monkeypatch)
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([1e-3 * lr_factor(step, 0, 4) for step in range(4)])
    with pytest.raises(ValueError, match="lr_decay"):
        ReadoutModule(classifier="synthetic-cnn", weights=None, lr_decay="linear")  # type: ignore[arg-type]


def test_negative_warmups_are_refused():
    with pytest.raises(ValueError, match="beta_warmup_steps"):
        ReadoutModule(classifier="synthetic-cnn", weights=None, beta_warmup_steps=-1)


def test_a_run_logs_what_the_readme_promises_to_tensorboard(tiny_shards, tmp_path, monkeypatch):
    """Loss, CE, bits per image, top-1 with and without the bottleneck, lr, images/s, validation
    metrics and the heatmap grid, every step (``heatmap_every_n_steps: 1``)."""
    config = tiny_config(tiny_shards, max_steps=2, val_check_interval=2, limit_val_batches=1)
    config["model"].update(input_size=SIZE, heatmap_every_n_steps=1, num_heatmaps=4)
    config["data"].update(image_size=SIZE, resize=SIZE, val_shards=str(tiny_shards))
    cli, events = fit_with_tensorboard(config, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 2
    scalars = set(events.Tags()["scalars"])
    promised = {
        "train/loss": "loss",
        "train/ce": "cross-entropy",
        "train/bits_per_image": "information in bits per image",
        "train/top1": "top-1 without the bottleneck",
        "train/top1_bottleneck": "top-1 with the bottleneck",
        "train/lr": "learning rate",
        "train/images_per_s": "images/s",
        "val/loss": "validation loss",
        "val/ce": "validation cross-entropy",
        "val/bits_per_image": "validation bits per image",
        "val/top1": "validation top-1",
        "val/top1_bottleneck": "validation top-1 with the bottleneck",
    }
    missing = {tag: what for tag, what in promised.items() if tag not in scalars}
    assert not missing, f"not logged: {missing}; logged: {sorted(scalars)}"
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3, 1e-3])
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    assert all(e.value > 0 for e in events.Scalars("train/bits_per_image"))
    assert all(0 <= e.value <= 1 for e in events.Scalars("val/top1_bottleneck"))

    assert "heatmaps" in events.Tags()["images"]
    grids = events.Images("heatmaps")
    # the sanity check's validation (step 0), every training step, the validation after step 2
    assert [g.step for g in grids] == [0, 1, 2, 2]
    assert all(g.width * g.height >= 2 * 4 * SIZE * SIZE for g in grids)  # 4 images and their maps
