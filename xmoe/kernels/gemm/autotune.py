"""Choosing a kernel configuration per problem shape by timing the candidates once.

Choices are kept in ``$XMOE_CACHE_DIR/gemm_autotune.json`` (default ``~/.cache/xmoe``),
keyed by device, variant and shape (rows rounded up to a power of two), so a shape is
timed once per machine. ``XMOE_GEMM_AUTOTUNE=0`` takes the first candidate instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from xmoe.kernels.gemm.spec import GemmConfig

_TIMED_RUNS = 3


def cache_path() -> Path:
    return Path(os.environ.get("XMOE_CACHE_DIR", Path.home() / ".cache" / "xmoe")) / "gemm_autotune.json"


def row_bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two: shapes in one bucket share a choice."""
    return 1 << max(rows - 1, 0).bit_length()


def shape_key(device: str, variant: str, rows: int, n: int, k: int, groups: int) -> str:
    return f"{device}|{variant}|M{row_bucket(rows)}|N{n}|K{k}|G{groups}"


class Autotuner:
    """Remembers the fastest config per key, in memory and on disk."""

    def __init__(self) -> None:
        self._choices: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._choices is None:
            try:
                self._choices = json.loads(cache_path().read_text())
            except (OSError, ValueError):
                self._choices = {}
        return self._choices

    def choose(self, key: str, candidates: Sequence[GemmConfig], time_ms: Callable[[GemmConfig, int], float]) -> GemmConfig:
        """The cached choice for ``key``, else the fastest candidate by ``time_ms(config, runs)``."""
        if len(candidates) == 1 or os.environ.get("XMOE_GEMM_AUTOTUNE") == "0":
            return candidates[0]
        choices = self._load()
        if key in choices:
            cached = GemmConfig(**choices[key])
            if cached in candidates:
                return cached
        timings = {config: time_ms(config, _TIMED_RUNS) for config in candidates}
        best = min(timings, key=timings.get)
        choices[key] = best.__dict__
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(choices, indent=1, sort_keys=True))
        partial.replace(path)
        return best
