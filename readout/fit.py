"""``python -m readout.fit --config configs/resnet50.yaml``: train a Readout Bottleneck, then export it.

A LightningCLI: every field of the config can be overridden on the command line
(``--trainer.devices 8 --data.train_shards 'data/imagenet/train-{000000..001023}.tar'``).
``--ckpt_path last`` resumes from the newest checkpoint of the run directory (step, optimiser,
estimator statistics, data epoch). At the end, rank 0 exports a bundle to ``--export_dir``
(default ``<trainer.default_root_dir>/export``) that ``readout.load`` reads without Lightning.
"""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from readout.datamodule import ReadoutDataModule
from readout.export import export_module
from readout.lit import ReadoutModule


class ReadoutCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from: a path, or 'last' for the newest in the run directory",
        )
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where the bundle goes at the end (default: <trainer.default_root_dir>/export)",
        )


def resolve_checkpoint(ckpt_path: str | None, root: str) -> str | None:
    """'last' means the newest ``last*.ckpt`` under the run directory, or a fresh start if none."""
    if ckpt_path != "last":
        return ckpt_path
    candidates = sorted(Path(root).glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(candidates[-1]) if candidates else None


def main(args: list[str] | None = None) -> ReadoutCLI:
    cli = ReadoutCLI(
        ReadoutModule,
        ReadoutDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m readout.fit", "description": __doc__.splitlines()[0]},
    )
    trainer = cli.trainer
    ckpt_path = resolve_checkpoint(cli.config.ckpt_path, trainer.default_root_dir)
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero and not trainer.interrupted:
        out = cli.config.export_dir or str(Path(trainer.default_root_dir) / "export")
        export_module(cli.model, out)
        print(f"exported the readout to {out}")
    return cli


if __name__ == "__main__":
    main()
