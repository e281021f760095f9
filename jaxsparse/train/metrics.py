"""Metrics to JSONL (one object per line) and TensorBoard event files, from process 0."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import jax


class MetricWriter:
    """``resume_step``: the checkpoint step a resumed run continues from. TensorBoard is told to
    drop the earlier run's events past it (they are logged again), and :meth:`flush` is called
    at every checkpoint, so a run killed later keeps every event up to its checkpoint (events
    still in tensorboardX's buffer were lost, and those flushed past it were shown twice)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        self._tb_dir = Path(workdir) / "tensorboard"
        self._files = 0
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and self.path.is_file() and not _ends_with_newline(self.path):
            with self.path.open("a") as f:  # a run killed mid-write left half a record:
                f.write("\n")  # end it, so the next record starts a line of its own
        if self.enabled and tensorboard:
            self._tb = self._open(purge_step=resume_step + 1 if resume_step else None)

    def _open(self, purge_step=None):
        """A tensorboardX writer on a file of its own. Its name is only ``[seconds].[host]``
        by default: a writer opened in the same second as another (a quick resume, or
        :meth:`flush`) wrote over that one's file; a process id and count keep each apart
        (and in the order TensorBoard reads them)."""
        from tensorboardX import SummaryWriter

        self._files += 1
        return SummaryWriter(str(self._tb_dir), purge_step=purge_step,
                             filename_suffix=f".{os.getpid()}.{self._files:06d}")

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

    def flush(self) -> None:
        """Write every TensorBoard event logged so far to disk (``metrics.jsonl`` is never
        buffered). tensorboardX's own ``flush`` leaves the events still queued for its writer
        thread; closing drains the queue, and the next events go to a new file."""
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            return True  # empty
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records; for a step logged twice (a resumed run redoing steps) the last one wins.

    Lines that are not a record (half a line from a run killed mid-write) are skipped with a
    warning naming them, so one torn line does not hide the rest of a run."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict] = {}
    torn = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            latest[(record["split"], int(record["step"]))] = record
        except (ValueError, TypeError, KeyError):
            torn.append(number)
    if torn:
        warnings.warn(f"{path}: skipped {len(torn)} line(s) that are not metric records "
                      f"(line {', '.join(map(str, torn[:5]))}{', ...' if len(torn) > 5 else ''})",
                      stacklevel=2)
    return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))
