"""What every benchmark shares: timing with CUDA events, the device name, the JSON and PNG."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], Any], iterations: int, warmup: int = 3, batch: int = 1) -> float:
    """Median over ``iterations`` of ``fn``'s time between CUDA events on the current stream, in ms.

    ``batch`` > 1 times that many calls back to back and divides: the host queues the next
    call while the GPU runs one, so the result is GPU time unless host time per call is larger.
    """
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    times.sort()
    return times[len(times) // 2]


def device_name(num_gpus: int) -> str:
    import torch

    return f"{num_gpus}x {torch.cuda.get_device_name(0)}"


def slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def commit() -> str:
    """The commit measured: ``XMOE_COMMIT`` (the device machine's copy has no git history), else git's HEAD."""
    if os.environ.get("XMOE_COMMIT"):
        return os.environ["XMOE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(benchmark: str, device: str, mode: str, rows: list[dict[str, Any]], out_dir: Path,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``<benchmark>-<slug>.json`` (DESIGN.md section 5) and a PNG of its rows beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{benchmark}-{slug(device.replace('NVIDIA', ''))}-{slug(mode)}"
    record = {"benchmark": benchmark, "device": device, "mode": mode,
              "date": datetime.date.today().isoformat(), "commit": commit(), "rows": rows, **(extra or {})}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    plot(record, out_dir / f"{name}.png")
    return path


def plot(record: dict[str, Any], path: Path) -> None:
    """One panel per metric and baseline: xmoe against the baseline, by case, each xmoe bar
    labelled with its ratio to the baseline (>1 is better for xmoe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["metric"], row["baseline_name"] or "") for row in record["rows"]})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False,
                             constrained_layout=True)  # room for the suptitle, which tight_layout overlaps
    for ax, (metric, baseline_name) in zip(axes[:, 0], panels):
        rows = [row for row in record["rows"]
                if row["metric"] == metric and (row["baseline_name"] or "") == baseline_name]
        positions = range(len(rows))
        bars = ax.bar([p - 0.2 for p in positions], [row["xmoe"] or 0 for row in rows], 0.4, label="xmoe")
        if baseline_name:
            ax.bar([p + 0.2 for p in positions], [row["baseline"] or 0 for row in rows], 0.4, label=baseline_name)
            ax.bar_label(bars, [f"{ratio(row):.2f}x" if ratio(row) is not None else "" for row in rows], fontsize=6)
        ax.set_xticks(list(positions), [row["case"] for row in rows], rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{metric}" + (f", against {baseline_name}" if baseline_name else ""), fontsize=9)
        ax.set_ylabel(rows[0]["unit"])
        ax.legend(fontsize=7)
    fig.suptitle(f"{record['benchmark']}: {record['device']}, {record['mode']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(row: dict[str, Any]) -> float | None:
    """How many times better xmoe is than the row's baseline (None without one)."""
    mine, base = row["xmoe"], row["baseline"]
    if not mine or not base:
        return None
    return mine / base if row["higher_is_better"] else base / mine
