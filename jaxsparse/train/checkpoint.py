"""Orbax checkpoints of the train state plus the config that produced them.

Each step directory holds two items: ``state`` (the sharded pytree) and ``meta`` (JSON: the
resolved config and the jaxsparse version). Before anything is restored or written, the saved
model config is compared with the current one, so an incompatible workdir fails with the list
of differing keys instead of a shape error deep inside orbax — and nothing is overwritten.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

import jaxsparse
from jaxsparse.config import Config, ConfigError, diff, from_dict, to_dict

# Sections that fix the shapes/structure of the train state; others (steps, data, eval)
# may change between a run and its continuation.
STRUCTURAL = ("model",)


class CheckpointMismatch(ConfigError):
    """The workdir holds checkpoints of a different model."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int | None = None) -> Config | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return from_dict(meta["meta"]["config"])

    def check_compatible(self, cfg: Config) -> None:
        saved = self.saved_config()
        if saved is None:
            return
        mismatch = diff(saved, cfg, STRUCTURAL)
        if mismatch:
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints (latest step {self.latest_step()}) of a "
                "different model; refusing to resume or overwrite them. Differences "
                "(saved -> requested):\n  " + "\n  ".join(mismatch)
                + "\nUse another --workdir, or the saved settings.")

    def save(self, step: int, state, cfg: Config, *, force: bool = False) -> bool:
        meta = {"config": to_dict(cfg), "version": jaxsparse.__version__}
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state, step: int | None = None):
        step = self.latest_step() if step is None else step
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not match the train state of the "
                f"current code/config: {err}") from err
        return out["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def is_primary() -> bool:
    return jax.process_index() == 0
