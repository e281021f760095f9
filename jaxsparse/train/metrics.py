"""Metrics to JSONL (one object per line) and TensorBoard event files, from process 0."""

from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from pathlib import Path

import jax


_EVENT_FILES = itertools.count(1)  # per process: writers in one second get distinct files


class MetricWriter:
    """``resume_step``: the step a run (re)starts from, its checkpoint's or 0. Records an
    earlier run logged past it belong to a trajectory that was given up (a kill, a divergence
    resumed with other settings): they are dropped from ``metrics.jsonl`` and TensorBoard is
    told to drop its events (the step-0 evaluation of a fresh start is rerun, so from 0 there;
    a resumed run's checkpoint step is kept). :meth:`flush` is called at every checkpoint, so a
    run killed later keeps every event up to its checkpoint (events still in tensorboardX's
    buffer were lost, those flushed past it shown twice, and the jsonl kept a diverged run's
    record at a step the resumed run did not log again)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True,
                 resume_step: int | None = None):
        self._tb_dir = Path(workdir) / "tensorboard"
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and self.path.is_file() and not _ends_with_newline(self.path):
            with self.path.open("a") as f:  # a run killed mid-write left half a record:
                f.write("\n")  # end it, so the next record starts a line of its own
        if self.enabled and resume_step is not None and self.path.is_file():
            _drop_records_past(self.path, resume_step)
        if self.enabled and tensorboard:
            purge = None if resume_step is None else (resume_step + 1 if resume_step else 0)
            self._tb = self._open(purge_step=purge)

    def _open(self, purge_step=None):
        """A tensorboardX writer on a file of its own. Its name is only ``[seconds].[host]``
        by default: a writer opened in the same second as another (a quick resume, or
        :meth:`flush`) wrote over that one's file; a process id and count keep each apart
        (and in the order TensorBoard reads them)."""
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self._tb_dir), purge_step=purge_step,
                             filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES):06d}")

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


def _drop_records_past(path: Path, step: int) -> None:
    """Rewrite ``path`` without the records of steps after ``step`` (atomically: a kill
    leaves the old file or the new one). Lines that are not records are kept as they are."""
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        parsed = _parse_record(line)
        past = parsed is not None and parsed[1][1] > step
        dropped += past
        if not past:
            kept.append(line)
    if dropped:
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept))
        os.replace(partial, path)


def _parse_record(line: str) -> tuple[dict, tuple[str, int]] | None:
    """``(record, (split, step))`` of a metrics line; None for a line that is not a record
    (half a line from a run killed mid-write, JSON of another shape)."""
    try:
        record = json.loads(line)
        return record, (record["split"], int(record["step"]))
    except (ValueError, TypeError, KeyError):
        return None


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
        parsed = _parse_record(line)
        if parsed is None:
            torn.append(number)
        else:
            latest[parsed[1]] = parsed[0]
    if torn:
        warnings.warn(f"{path}: skipped {len(torn)} line(s) that are not metric records "
                      f"(line {', '.join(map(str, torn[:5]))}{', ...' if len(torn) > 5 else ''})",
                      stacklevel=2)
    return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))
