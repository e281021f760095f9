"""Metrics to JSONL (one object per line) and TensorBoard event files, from process 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


class MetricWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(),
                  **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records; for a step logged twice (a resumed run redoing steps) the last one wins."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["split"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))
