"""A ``readout.fit`` checkpoint (or a trained module) as a bundle; the CLI ``python -m readout.export``.

The bundle format itself, and loading it without Lightning, is :mod:`readout.bundle`.
"""

from __future__ import annotations

import argparse
from typing import Any

from readout.backbones import refuse_import
from readout.bundle import export_bundle
from readout.training.checkpointing import read_checkpoint
from readout.training.module import ReadoutModule


def export_checkpoint(checkpoint: str, out: str, allow_import: bool = False) -> str:
    """Exports a ``readout.fit`` checkpoint (checked whole, loaded with ``weights_only=True``) as a bundle."""
    state = read_checkpoint(checkpoint)
    # LightningCLI adds its own keys (``_instantiator``, ``_class_path``) to the hyper-parameters.
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    refuse_import(str(hparams.get("classifier", "")), checkpoint, allow_import)
    module = ReadoutModule(**hparams)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return export_module(module, out)


def export_module(module: Any, out: str, training: dict[str, Any] | None = None) -> str:
    """Exports a trained :class:`~readout.training.module.ReadoutModule` (``training``: as in
    :func:`export_bundle`)."""
    hparams = module.hparams
    classifier = {
        "name": hparams.classifier,
        "weights": hparams.weights,
        "weights_path": hparams.weights_path,
    }
    return export_bundle(module.attributor, out, classifier, hparams.beta, module.fingerprint, training)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m readout.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by readout.fit (local path or fsspec URL)")
    parser.add_argument("--out", required=True, help="directory of the bundle (local path or fsspec URL)")
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="rebuild a classifier the checkpoint names by import path (runs that code: trust the file)",
    )
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, args.allow_import))
