"""What the study scripts (``experiments/<area>/study.py`` and the SSM task scripts) share.

A study trains each of its runs in a directory of its own under ``--out`` and resumes a run
it finds there. A directory that holds a run saved with other settings is refused before
anything trains: ``train`` would resume it on the new settings (another ``--steps`` is another
learning-rate schedule from the saved step on), and the table would label the result with
settings neither run had. A run with exactly the same settings is read back (or resumed).

The scripts import this file from beside their own folder::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/
    from study_runs import refuse_other_settings
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from jaxsparse.config import diff
from jaxsparse.train.loop import read_config, with_absolute_paths


def other_settings(cfg, workdir: Path) -> list[str]:
    """``key: saved -> now`` for every setting of the run saved in ``workdir`` that ``cfg``
    changes (empty when there is no saved run or the settings are the same)."""
    saved = Path(workdir) / "config.json"
    if not saved.exists():
        return []
    return diff(read_config(saved), with_absolute_paths(cfg))


def refuse_other_settings(cfg, workdir: Path, fresh_flag: str | None = None) -> None:
    """Stop (``SystemExit`` with a message naming ``workdir`` and the differing keys) if
    ``workdir`` holds a run saved with settings other than ``cfg``. ``fresh_flag``: the
    script's flag that retrains its runs from step 0, if it has one."""
    changes = other_settings(cfg, workdir)
    if not changes:
        return
    retrain = f"delete {workdir}" + (f" (or rerun with {fresh_flag})" if fresh_flag else "")
    raise SystemExit(f"{workdir} holds a run trained with other settings (saved -> now):\n  "
                     + "\n  ".join(changes) + f"\nNothing was trained. Pass another --out, or "
                     f"{retrain} to retrain it there.")


def refuse_any_other_settings(planned: Iterable[tuple[object, Path]],
                              fresh_flag: str | None = None) -> None:
    """:func:`refuse_other_settings` for every ``(cfg, workdir)`` of a study, before any of
    them trains: a refusal of the last run costs no training time."""
    for cfg, workdir in planned:
        refuse_other_settings(cfg, workdir, fresh_flag)
