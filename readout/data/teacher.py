"""Teacher files (:mod:`readout.tools.teacher` writes them): a Per-Sample map per training sample, by key.

A safetensors file (no code runs on loading): one float16 tensor ``maps`` (N, h, w), bits per
bottleneck location summed over channels, and in its metadata the sample keys (a JSON list, in the
order of ``maps``) and how the maps were made (classifier and its fingerprint, layer, β).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

FORMAT = "readout-teacher/1"


@dataclass(frozen=True)
class TeacherInfo:
    """How a teacher file's maps were made (its metadata)."""

    classifier: str
    fingerprint: str
    layer: str
    beta: float
    grid: tuple[int, int]
    count: int


class TeacherMaps:
    """A teacher file, read lazily: ``maps[key]`` is the (h, w) float32 map of the sample ``key``.

    Only the header (keys and metadata) is read when it is opened; each map is read on request, so
    loader workers share the file through the page cache instead of holding copies of it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(
                f"no teacher file at {self.path}: make one with python -m readout.tools.teacher"
            )
        try:
            with safe_open(self.path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                shape = handle.get_slice("maps").get_shape()
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{self.path} is not a teacher file ({error})") from error
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a teacher file (format {metadata.get('format')!r})")
        keys = json.loads(metadata["keys"])
        if len(keys) != shape[0]:
            raise ValueError(f"{self.path} is damaged: {len(keys)} keys for {shape[0]} maps")
        self.index = {key: i for i, key in enumerate(keys)}
        self.info = TeacherInfo(
            classifier=metadata["classifier"],
            fingerprint=metadata["fingerprint"],
            layer=metadata["layer"],
            beta=float(metadata["beta"]),
            grid=(int(shape[1]), int(shape[2])),
            count=int(shape[0]),
        )
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}  # each loader worker opens its own

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.index:
            raise KeyError(
                f"sample {key!r} has no map in the teacher file {self.path} ({self.info.count} maps): "
                "it was made from other shards; run python -m readout.tools.teacher on the training shards"
            )
        if self._handle is None:
            self._handle = safe_open(self.path, framework="pt")
        i = self.index[key]
        return self._handle.get_slice("maps")[i : i + 1][0].float().numpy()
