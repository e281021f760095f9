"""Orbax checkpoints of the train state plus the config that produced them.

Each step directory holds two items: ``state`` (the sharded pytree) and ``meta`` (JSON: the
resolved config and the jaxsparse version). Before anything is restored or written, the saved
model config is compared with the current one, so an incompatible workdir fails with the list
of differing keys instead of a shape error deep inside orbax — and nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import traceback
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

import jaxsparse
from jaxsparse.config import Config, ConfigError, from_dict, to_dict
from jaxsparse.config_usage import model_differences


class CheckpointMismatch(ConfigError):
    """The workdir holds checkpoints of a different model."""


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint holds the right arrays but some of their data cannot be read."""


# tensorstore status codes of data that is not there or not intact
_UNREADABLE = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_FAILED_READ = "Encountered error while reading array index"  # orbax's wrapper of the above


def _innermost(err: BaseException) -> BaseException:
    """The error ``err`` was raised from, through every level (tensorstore's own message, e.g.
    ``DATA_LOSS: ...``, under orbax's generic wrapper)."""
    seen = {id(err)}
    while (err.__cause__ or err.__context__) is not None:
        inner = err.__cause__ or err.__context__
        if id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    return err


def _bad_json(err: BaseException) -> json.JSONDecodeError | None:
    """The JSON error in ``err``'s chain, if any: a metadata file emptied or cut short."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, json.JSONDecodeError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _damage_reason(err: BaseException) -> BaseException | str:
    """What to report of an error reading a checkpoint: a JSON error in its chain is named as
    such, since the innermost error under it is json's internal ``StopIteration(0)`` (an
    emptied file), which would read as the reason "0"."""
    bad = _bad_json(err)
    return f"a metadata file does not parse as JSON ({bad})" if bad is not None else err


def _unreadable(err: BaseException) -> bool:
    """Whether ``err`` or an error it was raised from says that stored data could not be read."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if any(code in text for code in _UNREADABLE) or "was not found in the checkpoint" in text:
            return True
        if _bad_json(err) is not None:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _quiet_closed_loop_callbacks():
    """When a restore fails, orbax closes its event loop while tensorstore's other reads are
    in flight; each of them then reports ``RuntimeError: Event loop is closed`` as an
    unraisable exception (hundreds of tracebacks around the one error that matters); with a
    damaged data file, every other read of it reports its own failure as its coroutine is
    collected. Only those exceptions are dropped: during a restore, and after a failed one for
    good (the last callbacks arrive after the manager has closed)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        sibling_read = str(error).startswith(_FAILED_READ)
        if not (closed_loop or sibling_read):
            previous(unraisable)

    sys.unraisablehook = hook
    yield  # an exception propagates from here and leaves the filter in place
    sys.unraisablehook = previous


def _release_failed_reads(err: BaseException) -> None:
    """Drop now what a failed restore left behind, instead of in whatever code the garbage
    collector next runs. When one read fails, orbax's event loop stops and closes with reads
    that were scheduled but never started (``asyncio.gather`` wraps them in tasks that only
    run on the next pass of the loop, which never comes); the error's traceback keeps the
    frames that hold them (orbax's ``read_array_coros`` list). When that chain was collected
    later, each such coroutine warned ``RuntimeWarning: coroutine
    '_read_array_index_and_device_put' was never awaited`` — once seen in an unrelated test.
    Clearing the frames' locals (the traceback still prints) and collecting here lets those
    warnings fire inside a filter that drops them, and only them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                                category=RuntimeWarning)
        seen = set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            traceback.clear_frames(err.__traceback__)  # skips the frames still executing
            err = err.__cause__ or err.__context__
        gc.collect()  # what the cleared frames held in reference cycles (tasks, futures)


def _first_line(err: Exception, limit: int = 300) -> str:
    """An error's first line, cut short: tensorstore appends its whole JSON spec."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(" [tensorstore_spec")[0]
    return text if len(text) <= limit else text[:limit] + " ..."


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        # the handlers named up front: item_metadata can then read a checkpoint's tree
        # before anything is restored from it (saved_state_keys)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int | None = None) -> Config | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return from_dict(self._meta(step)["config"])
        except (KeyError, FileNotFoundError, ValueError, TypeError) as err:
            raise self._damaged(step, _damage_reason(err)) from None

    def saved_state_keys(self, step: int) -> set[str] | None:
        """The top-level entries of the train state saved at ``step`` (``step``, ``params``,
        ...), or None where its metadata cannot be read (restore then names the problem)."""
        try:
            return set(self.manager.item_metadata(step)["state"].keys())
        except Exception:  # noqa: BLE001 — best-effort, as in _name_differences
            return None

    def saved_corpus(self, step: int) -> dict | None:
        """What the text corpus held when ``step`` was saved (files and bytes per split,
        :attr:`jaxsparse.data.stream.TextStream.corpus`); None for a synthetic task or a
        checkpoint saved before this was recorded."""
        try:
            return self._meta(step).get("corpus")
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise self._damaged(step, _damage_reason(err)) from None

    def _meta(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"]

    def check_compatible(self, cfg: Config) -> None:
        saved = self.saved_config()
        if saved is None:
            return
        mismatch = model_differences(saved, cfg)  # data, train, eval may change on resuming
        if mismatch:
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints (latest step {self.latest_step()}) of a "
                "different model; refusing to resume or overwrite them. Differences "
                "(saved -> requested):\n  " + "\n  ".join(mismatch)
                + "\nUse another --workdir, or the saved settings.")

    def save(self, step: int, state, cfg: Config, *, corpus: dict | None = None,
             force: bool = False) -> bool:
        meta = {"config": to_dict(cfg), "version": jaxsparse.__version__}
        if corpus is not None:
            meta["corpus"] = corpus
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state, step: int | None = None):
        step = self.latest_step() if step is None else step
        saved = sorted(self.manager.all_steps())
        if step not in saved:
            raise FileNotFoundError(f"{self.directory} holds no checkpoint of step {step}; "
                                    f"saved steps: {saved or 'none'}")
        with _quiet_closed_loop_callbacks():
            try:
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except Exception as err:  # noqa: BLE001 — named below, or raised as it came
                # orbax wraps tensorstore's read errors (a data file deleted or truncated) in
                # a plain Exception; the tree mismatches it reports are Value/Key/TypeErrors
                if not isinstance(err, ValueError | KeyError | TypeError) and not _unreadable(err):
                    self.close()
                    raise
                try:
                    self._name_differences(abstract_state, step)  # another model's state?
                    self._name_unreadable(step, err)  # the same tree, data missing?
                    raise CheckpointMismatch(
                        f"checkpoint {self.directory}/{step} does not match the train state of "
                        f"the current code/config: {_first_line(err)}") from err
                finally:
                    self.close()  # waits for the reads still in flight, inside the filter
                    _release_failed_reads(err)
        return out["state"]

    def _name_unreadable(self, step: int, err: Exception) -> None:
        """After a failed restore of a checkpoint with the right arrays: its data cannot be
        read (a file deleted or truncated, a disk error, an item missing)."""
        if _unreadable(err):
            raise self._damaged(step, _damage_reason(err))

    def _damaged(self, step: int, reason) -> CheckpointDamaged:
        """The error for a checkpoint that cannot be read, naming the way back: the step
        before it, if one is kept."""
        saved = sorted(self.manager.all_steps())
        earlier = [s for s in saved if s < step]
        way_back = (f"move {self.directory / str(step)} aside to resume from step {earlier[-1]} "
                    f"(saved steps: {saved})" if earlier else
                    "no earlier checkpoint is kept here; use another --workdir")
        why = _first_line(_innermost(reason)) if isinstance(reason, Exception) else reason
        return CheckpointDamaged(
            f"checkpoint {self.directory}/{step} is damaged or incomplete: {why}; {way_back}")

    def _name_differences(self, abstract_state, step: int) -> None:
        """After a failed restore: name the arrays the current model needs that the checkpoint
        lacks (and the reverse), e.g. routing centroids, instead of orbax's tree dump."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 — metadata is best-effort; restore reports the rest
            return

        def paths(tree):
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            def name(k):  # DictKey .key, GetAttrKey .name (optax namedtuples), SequenceKey .idx
                for attr in ("key", "name", "idx"):
                    if hasattr(k, attr):
                        return str(getattr(k, attr))
                return str(k)

            return {"/".join(name(k) for k in path) for path, _ in leaves}

        want, have = paths(abstract_state), paths(saved)
        if not have:  # no array metadata at all: the item's own metadata file is gone
            raise self._damaged(step, "its state holds no readable array metadata")
        missing, extra = sorted(want - have), sorted(have - want)
        if missing or extra:
            def show(names):
                return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not hold the state this model needs: "
                + (f"missing {show(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {show(extra)}" if extra else "")
                + ". Was it written by another model or version? Use another --workdir.")

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def is_primary() -> bool:
    return jax.process_index() == 0
