"""``python -m readout.fit --config configs/resnet50.yaml``: train a Readout Bottleneck, then export it.

A LightningCLI: every field of the config can be overridden on the command line
(``--trainer.devices 8 --data.train_shards 'data/imagenet/train-{000000..001023}.tar'``).
``--run_dir DIR`` moves the whole run into DIR (logs, checkpoints, bundle). ``--ckpt_path last``
resumes from the newest checkpoint of the run directory (step, optimiser, estimator statistics,
position in the data), a SLURM requeue's ``hpc_ckpt_*.ckpt`` included. At the end, rank 0 exports a
bundle to ``--export_dir`` (default ``<trainer.default_root_dir>/export``) that ``readout.load`` reads
without Lightning.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace
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
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="the run's directory: becomes trainer.default_root_dir, and the logger's save_dir, the "
            "checkpoint dirpaths and export_dir that lie under the config's default_root_dir move with it",
        )

    def before_instantiate_classes(self) -> None:
        if self.config.run_dir is not None:
            move_run(self.config, self.config.run_dir)


def move_run(config: Namespace, run_dir: str) -> None:
    """Puts a parsed config's run into ``run_dir``: paths under the old default_root_dir are rebased.

    One directory per run is what a requeued SLURM job needs to find its checkpoints again; a config's
    paths cannot be overridden one by one from the command line when they sit in a list of callbacks.
    """
    old = config.trainer.default_root_dir
    config.trainer.default_root_dir = run_dir

    def rebase(path: str | None) -> str | None:
        if path is None or old is None or not Path(path).is_relative_to(old):
            return path
        return str(Path(run_dir) / Path(path).relative_to(old))

    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    for component in [*loggers, *(config.trainer.callbacks or [])]:
        init_args = getattr(component, "init_args", None)
        for key in ("save_dir", "dirpath"):
            if init_args is not None and getattr(init_args, key, None) is not None:
                setattr(init_args, key, rebase(getattr(init_args, key)))
    config.export_dir = rebase(config.export_dir)


def resolve_checkpoint(ckpt_path: str | None, root: str) -> str | None:
    """'last' means the newest checkpoint of the run directory, or a fresh start if there is none.

    Candidates: ``last*.ckpt`` anywhere under ``root`` (ModelCheckpoint's) and ``root/hpc_ckpt_*.ckpt``
    (what Lightning saves on SLURM's requeue signal). Lightning looks for the latter only when no
    checkpoint is given, so it has to be weighed here. On equal times (coarse clocks of network file
    systems) the signal's checkpoint wins: it is written after the periodic one of the same step.
    """
    if ckpt_path != "last":
        return ckpt_path
    base = Path(root)
    candidates = [*base.glob("hpc_ckpt_*.ckpt"), *base.glob("**/last*.ckpt")]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("hpc_ckpt_")))
    return str(newest)


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
