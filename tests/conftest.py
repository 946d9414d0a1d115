"""Shared fixtures: tiny, seeded and written under ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import pytest

import readout.precision
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
