"""Shared fixtures: tiny, seeded and written under ``tmp_path``."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import readout.precision
from readout.backbones import load_classifier, save_classifier
from readout.data.synthetic import write_shards

#: What ``tiny_shards`` holds: 3 shards x 8 synthetic images at 32 px, seed 0.
TINY_SHARDS = {"n": 24, "size": 32, "seed": 0, "shard_size": 8}


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """A directory with 3 synthetic shards of 8 images at 32 px (seed 0) and their manifest.json."""
    out = tmp_path / "tiny_shards"
    write_shards(out, **TINY_SHARDS)
    return out


@pytest.fixture(autouse=True)
def fp32_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision="auto"`` resolves to fp32 in every test, on every machine: the tests that compare
    with references hold on a CPU with native bf16 too. Tests of bf16 ask for it by name."""
    monkeypatch.setattr(readout.precision, "native_bf16", lambda device: False)


# ------------------------------------------------------------------------------------------------------
# Tiny runs of readout.fit (helpers.fit_args); their modules ask for one_thread in their pytestmark


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    its module-scoped fixtures included: tests share two cores with others, and two threads per
    process on 64-px images spin while waiting for each other, slower rather than faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards of 8 synthetic 64-px images."""
    out = tmp_path_factory.mktemp("reliability") / "shards"
    write_shards(out, n=24, size=64, seed=0, shard_size=8)
    return out


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``fit_args`` on ``shards`` run through, outside SLURM, on one thread: what an interrupted and
    resumed run must end with."""
    # imported here: helpers and readout.fit bring in Lightning (~1.5 s), which most test files never need
    from helpers import fit_args

    from readout.training.fit import main as fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            patch.delenv(key)
        cli = fit(fit_args(shards, tmp_path_factory.mktemp("uninterrupted") / "run"))
    torch.set_num_threads(threads)
    return cli


# ------------------------------------------------------------------------------------------------------
# The fault matrix (`make faults`): tests marked ``@pytest.mark.fault(fault, phase, happened)`` become rows
# of a table printed at the end of the session (and written to ``--fault-table FILE``, markdown). A test
# records what it measured with the ``fault_result`` fixture: ``steps_lost`` (steps trained again after
# the resume) and ``same_weights`` (True once its comparison with an uninterrupted run has passed).

_FAULT_ROWS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-table", default=None, help="write the fault matrix (markdown) to this file")


@pytest.fixture
def fault_result(request: pytest.FixtureRequest) -> dict:
    record: dict = {}
    request.node.fault_record = record
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or report.when != "call":
        return
    fault, phase, happened = marker.args
    callspec = getattr(item, "callspec", None)
    record = getattr(item, "fault_record", {})
    _FAULT_ROWS.append(
        {
            "fault": fault + (f" ({callspec.id})" if callspec is not None else ""),
            "phase": phase,
            "happened": happened,
            "steps_lost": record.get("steps_lost"),
            "same_weights": record.get("same_weights"),
            "test": report.outcome,
            "where": item.nodeid,
        }
    )


def fault_table(rows: list[dict]) -> str:
    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    lines = [
        "| fault | phase | what happens | steps lost | final weights = uninterrupted | test |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['fault']} | {row['phase']} | {row['happened']} | {cell(row['steps_lost'])} "
            f"| {cell(row['same_weights'])} | {row['test']} |"
        )
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _FAULT_ROWS:
        return
    table = fault_table(_FAULT_ROWS)
    terminalreporter.section("fault matrix")
    terminalreporter.write(table)
    out = config.getoption("--fault-table")
    if out:
        header = (
            "# The fault matrix\n\nWritten by `make faults` "
            f"(`pytest -m fault --fault-table=docs/faults.md`) on {datetime.date.today().isoformat()}: "
            "every test marked `fault`, slow ones included. A row says what its test asserts; "
            '"steps lost" are the steps trained again after the resume, "final weights" whether the '
            "test compared them with an uninterrupted run's and they agreed (– where it does not "
            "compare).\n\n"
        )
        Path(out).write_text(header + table)
        terminalreporter.write_line(f"written to {out}")


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved synthetic-cnn of random weights (seed 0), shared by a test module: its .safetensors path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "random-cnn.safetensors"
    save_classifier(load_classifier("synthetic-cnn", weights=None), path, {"note": "random, for tests"})
    return str(path)
