"""Where the shipped files are: the classifiers and the demo bundle that readout loads by name.

The folder is looked up at each call, in this order:

1. ``$READOUT_CHECKPOINTS``, when set and not empty: a directory of your own that holds files of the
   same names (a cluster's shared copy, a test's ``tmp_path``).
2. Otherwise the package data of ``readout.checkpoints``, found with :mod:`importlib.resources`. An
   installed wheel (``pip install .``) has it at ``site-packages/readout/checkpoints/``; an editable
   install (``pip install -e .``, which ``make venv`` runs) and the repository itself have it at the
   top-level ``checkpoints/``, which pyproject.toml maps onto that package.

What the folder ships: ``synthetic-cnn.safetensors`` (with its ``.json``), ``synthetic-cnn-224.*`` and
the bundle ``readout-demo/`` (:data:`DEMO_BUNDLE`); pyproject.toml's ``package-data`` lists them.
"""

import os
from importlib.resources import files
from pathlib import Path

#: The environment variable that points the lookup at another folder.
ENV_VAR = "READOUT_CHECKPOINTS"
#: The package whose data folder holds the shipped files.
PACKAGE = "readout.checkpoints"
#: The name of the demo bundle in that folder (``make demo`` trains and exports it).
DEMO_BUNDLE = "readout-demo"


def checkpoint_dir() -> Path:
    """The folder of shipped files: ``$READOUT_CHECKPOINTS`` if set, else the installed package data."""
    # An empty value counts as unset: Path("") would be the current directory.
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    folder = files(PACKAGE)
    if not isinstance(folder, Path):
        raise RuntimeError(
            f"readout's shipped files lie in {folder}, which is not a folder on disk (a zip import?): "
            f"install readout as plain files, or set {ENV_VAR} to a folder holding them"
        )
    return folder


def shipped(name: str) -> Path:
    """The shipped file or folder ``name`` (``"synthetic-cnn.safetensors"``, :data:`DEMO_BUNDLE`).

    Raises FileNotFoundError naming the folder searched, where it came from and what it holds.
    """
    folder = checkpoint_dir()
    path = folder / name
    if path.exists():
        return path
    source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else f"the package data of {PACKAGE}"
    raise FileNotFoundError(f"no shipped file {name!r} in {folder} ({source}); {_contents(folder)}")


def _contents(folder: Path) -> str:
    """What ``folder`` holds, for an error message; package files (``__init__.py``) are left out."""
    if not folder.is_dir():
        return "that folder does not exist"
    names = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in folder.iterdir()
        if not entry.name.startswith(("__", "."))
    )
    return f"it holds: {', '.join(names)}" if names else "it is empty"
