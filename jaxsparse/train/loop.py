"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxsparse.config import (SECTIONS, Config, ConfigError, MeshConfig, diff, from_json,
                              to_json, validate)
from jaxsparse.config_usage import model_differences, unread_data_keys
from jaxsparse.data import Shard, make_stream
from jaxsparse.errors import (DataChangeWarning, NonFiniteTraining, OlderConfigWarning,
                              ScheduleChangeWarning, SettingsWarning)
from jaxsparse.models.curriculum import stage_at, stages
from jaxsparse.parallel import check_batch_split, make_mesh
from jaxsparse.parallel.mesh import check_mesh, process_rows
from jaxsparse.parallel import distributed
from jaxsparse.train.checkpoint import CheckpointMismatch, Checkpointer
from jaxsparse.train.loss_scale import initial_loss_scale
from jaxsparse.train.metrics import MetricWriter
from jaxsparse.train.optim import lr_schedule
from jaxsparse.train.state import TrainSetup, count_params, learned_statistics
from jaxsparse.train.step import make_eval_step, make_train_step, schedule_count

LN2 = math.log(2.0)


@dataclasses.dataclass
class TrainResult:
    step: int  # steps completed
    losses: dict[int, float]  # train loss of every step run by this call, by step index
    eval_metrics: dict[str, float]
    stopped_early: bool  # stopped by SIGTERM or should_stop
    # this call's steps not applied for a non-finite loss, gradient or update (float16's
    # loss-scale overflows are not among them: the `scale_overflow` metric logs those, and the
    # `skipped_steps` metric counts both)
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    sample: str | None = None
    # the final train state (sharded as trained); left out of the repr, which printed every
    # parameter and optimiser moment (193 KB for the tiniest model)
    state: dict | None = dataclasses.field(default=None, repr=False)


def read_config(path: Path) -> Config:
    """A workdir's ``config.json``, or a ConfigError naming the file. Settings the file lacks
    (it was saved before they existed) are read as today's defaults, with an
    :class:`OlderConfigWarning` naming each and the default taken."""
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        text = path.read_text()
        cfg = from_json(text)
    except (ConfigError, TypeError, UnicodeDecodeError) as err:  # TypeError: a key's value
        raise ConfigError(f"{path}: {err}") from None
    missing = settings_missing_from(json.loads(text), cfg)
    if missing:
        warnings.warn(f"{path} was saved before these settings existed; read as today's "
                      f"defaults, which may not be what it trained with: {', '.join(missing)}",
                      OlderConfigWarning, stacklevel=2)
    return cfg


def settings_missing_from(raw: dict, cfg: Config) -> list[str]:
    """``section.key=default`` for every setting of ``cfg`` absent from its saved JSON."""
    return [f"{section}.{field.name}={getattr(getattr(cfg, section), field.name)!r}"
            for section in SECTIONS
            for field in dataclasses.fields(getattr(cfg, section))
            if field.name not in raw.get(section, {})]


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its file paths (``data.path``'s glob, ``data.cache_dir``,
    ``train.init_from``) resolved against the current directory: the workdir's
    ``config.json`` then names the same files when ``eval`` or a resumed run starts from
    another directory (a relative glob would silently match other files there)."""
    def absolute(path):
        if path is None or "://" in path:  # unset, or a URL (gs://...) that names itself
            return path
        return os.path.abspath(os.path.expanduser(path))

    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path),
                               cache_dir=absolute(cfg.data.cache_dir))
    train = dataclasses.replace(cfg.train, init_from=absolute(cfg.train.init_from))
    return dataclasses.replace(cfg, data=data, train=train)


def warn_if_the_schedule_moved(saved: Config | None, cfg: Config, step: int) -> None:
    """The schedule is rebuilt from the current ``train.steps`` and ``optimizer`` settings and
    applied from the checkpoint's step: extending a finished 500-step run to 1000 steps raises
    its learning rate from the end of one cosine decay to the middle of another (6× at the
    README's defaults). Allowed — it may be meant — but said, with both values: the rate at
    the resumed step, or where it first differs later (a change inside the warm-up leaves the
    rate at the step alone and moves the decay). So are the other optimiser settings (weight
    decay, betas, eps, clipping), each with both values: every update from there on differs."""
    if saved is None or step >= cfg.train.steps:  # nothing left to train on either schedule
        return
    schedule_keys = ("lr", "warmup_steps", "min_lr_ratio")
    before_at = lr_schedule(saved.optimizer, saved.train.steps)
    after_at = lr_schedule(cfg.optimizer, cfg.train.steps)
    # The resumed step, then the rest of the new run: both schedules are linear warm-ups and
    # cosines, so their ends and 16 points between find where they part (each point is a JAX
    # call of a few ms: a resume should not wait on hundreds)
    ends = (saved.optimizer.warmup_steps, cfg.optimizer.warmup_steps, saved.train.steps - 1)
    checked = sorted({step, cfg.train.steps - 1, *(int(at) for at in np.linspace(
        step, cfg.train.steps - 1, 16)), *(at for at in ends if step <= at < cfg.train.steps)})
    moved = None
    for at in checked:
        before, after = float(before_at(at)), float(after_at(at))
        if not math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-30):
            moved = (at, before, after)
            break
    if moved is not None:
        changed = [f"train.steps {saved.train.steps} -> {cfg.train.steps}"] * (
            saved.train.steps != cfg.train.steps)
        changed += [f"optimizer.{key} {getattr(saved.optimizer, key)} -> "
                    f"{getattr(cfg.optimizer, key)}" for key in schedule_keys
                    if getattr(saved.optimizer, key) != getattr(cfg.optimizer, key)]
        at, before, after = moved
        how = (f"the learning rate there moves from {before:.3g} to {after:.3g}" if at == step
               else f"the learning rate there is the same, but not later (at step {at}: "
                    f"{before:.3g} -> {after:.3g})")
        warnings.warn(
            f"resuming at step {step} on another learning-rate schedule ({'; '.join(changed)}): "
            f"{how}. To continue the saved schedule instead, resume with its settings",
            ScheduleChangeWarning, stacklevel=3)
    others = [f"optimizer.{f.name} {getattr(saved.optimizer, f.name)} -> "
              f"{getattr(cfg.optimizer, f.name)}" for f in dataclasses.fields(cfg.optimizer)
              if f.name not in schedule_keys
              and getattr(saved.optimizer, f.name) != getattr(cfg.optimizer, f.name)]
    if others:
        warnings.warn(
            f"resuming at step {step} with other optimiser settings ({'; '.join(others)}): the "
            "updates from here on are not those an uninterrupted run would make. To continue "
            "with the saved ones, resume with its settings", ScheduleChangeWarning, stacklevel=3)


def warn_if_the_data_moved(saved: Config | None, cfg: Config, step: int) -> None:
    """The batches are drawn from the current ``data`` settings: a resume with another seed,
    batch size, window length, corpus glob or split gives other batches (and validation
    windows) than the saved run's, so its losses are not those an uninterrupted run would
    give, and its eval curve is measured on other text from there on. Allowed — it may be
    meant — but said, each key with both values. ``data.cache_dir`` only says where the
    tokens are cached, and keys that neither run's task reads move nothing."""
    if saved is None:
        return
    ignored = {"data.cache_dir"} | (set(unread_data_keys(saved.data))
                                    & set(unread_data_keys(cfg.data)))
    if step >= cfg.train.steps and saved.data.task == cfg.data.task == "text":
        ignored.add("data.seed")  # nothing is trained, and text's eval windows are not drawn
    changed = [f"data.{field.name} {getattr(saved.data, field.name)!r} -> "
               f"{getattr(cfg.data, field.name)!r}" for field in dataclasses.fields(cfg.data)
               if f"data.{field.name}" not in ignored
               and getattr(saved.data, field.name) != getattr(cfg.data, field.name)]
    if changed:
        settings = f"with other data settings ({'; '.join(changed)})"
        _say_data_changed(step, cfg, settings, f"{settings} than it was trained with")
    if saved.eval.batches != cfg.eval.batches:
        # not only how many: text's validation windows are spread over the split by their
        # count, so another count evaluates other text (the training batches do not move)
        where = "resuming at" if step < cfg.train.steps else "evaluating the checkpoint of"
        warnings.warn(f"{where} step {step} with eval.batches {saved.eval.batches} -> "
                      f"{cfg.eval.batches}: the eval metrics from here on average other "
                      "batches (other validation windows) than the saved run's, and are not "
                      "comparable with its earlier ones; the training batches are unchanged",
                      DataChangeWarning, stacklevel=3)


def _say_data_changed(step: int, cfg: Config, resuming: str, evaluating: str, *,
                      only_evaluating: bool = False) -> None:
    """One :class:`DataChangeWarning`: a run resuming at ``step`` draws other batches from
    there on (``resuming`` says why), or the checkpoint of ``step`` is evaluated on other data
    (``evaluating`` says why) — nothing left to train, or ``only_evaluating``."""
    if step < cfg.train.steps and not only_evaluating:
        what = (f"resuming at step {step} {resuming}: the batches differ from the saved run's, "
                "so the losses and eval metrics from here on are not those an uninterrupted run "
                "would give. To continue on the saved data, resume with its settings")
    else:
        what = (f"evaluating the checkpoint of step {step} {evaluating}: the eval metrics are "
                "not comparable with the saved run's")
    warnings.warn(what, DataChangeWarning, stacklevel=4)


def saved_corpus(workdir: str | Path, step: int, cfg: Config) -> dict | None:
    """What the text corpus held when the checkpoint of ``step`` in ``workdir`` (trained with
    ``cfg``) was saved (:meth:`Checkpointer.saved_corpus`)."""
    ckpt = Checkpointer(Path(workdir).resolve() / "checkpoints",
                        keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        return ckpt.saved_corpus(step)
    finally:
        ckpt.close()


def warn_if_the_corpus_moved(saved: dict | None, now: dict | None, cfg: Config,
                             step: int, *, evaluating: bool = False) -> None:
    """The same ``data`` settings can name other text: files added to (or removed from) what
    ``data.path`` matches, or edited. The files and bytes of each split, saved with the
    checkpoint, are compared with what the stream opened now; a difference is said as
    :func:`warn_if_the_data_moved` says a changed setting (a same-size edit is not seen)."""
    if saved is None or now is None or saved == now:
        return
    changed = "; ".join(
        f"{split} {saved[split]['files']} files, {saved[split]['bytes']:,} bytes -> "
        f"{now[split]['files']} files, {now[split]['bytes']:,} bytes"
        for split in ("train", "valid") if saved.get(split) != now.get(split))
    where = (f"data.path={cfg.data.path!r}" if cfg.data.path
             else "the default corpus (data.path unset: this Python's standard library)")
    _say_data_changed(step, cfg,
                      f"on other text: {where} now matches another corpus than the saved "
                      f"run's ({changed})",
                      f"on other text: {where} now matches another corpus than the one it was "
                      f"trained on ({changed})", only_evaluating=evaluating)


def check_workdir(cfg: Config, workdir: Path) -> None:
    """Refuse a workdir whose saved config describes a different model (before writing)."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file, not a directory")
    saved = workdir / "config.json"
    if saved.exists():
        previous = read_config(saved)
        mismatch = model_differences(previous, cfg)
        if mismatch and (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            raise CheckpointMismatch(
                f"workdir {workdir} holds checkpoints of a different model; refusing to resume "
                "or overwrite them. Differences (saved -> requested):\n  " + "\n  ".join(mismatch))


def evaluate(setup: TrainSetup, eval_step, state, stream, cfg: Config) -> dict[str, float]:
    totals = np.zeros(3)
    for i in range(cfg.eval.batches):
        batch = setup.global_batch(stream.eval_batch(i, cfg.eval.batches))
        totals += np.array([float(x) for x in eval_step(state["params"], state["rest"], batch)])
    ce, correct, count = (float(total) for total in totals)  # Python floats, as annotated
    loss = ce / max(count, 1.0)
    metrics = {"loss": loss, "accuracy": correct / max(count, 1.0)}
    if cfg.data.task == "text":
        metrics["bits_per_byte"] = loss / LN2  # one token is one byte
    return metrics


def sample_bytes(setup: TrainSetup, state, cfg: Config, prompt: str | None = None,
                 max_new_tokens: int | None = None, seed: int = 0, *,
                 top_p: float = 1.0) -> bytes:
    """The prompt's UTF-8 bytes followed by the model's continuation, as the bytes it
    sampled (a byte-level model may emit any byte, valid UTF-8 or not); the continuation is
    cut to fit ``model.max_seq_len``. ``cfg.eval`` gives the temperature and top-k,
    ``top_p`` the nucleus (:func:`jaxsparse.models.generate.sample_logits`)."""
    from jaxsparse.models.generate import generate

    prompt = (cfg.eval.sample_prompt if prompt is None else prompt).encode()
    max_new = cfg.eval.sample_tokens if max_new_tokens is None else max_new_tokens
    if not 1 <= len(prompt) < cfg.model.max_seq_len:  # (the cut below would name max_new_tokens)
        raise ValueError(f"the prompt is {len(prompt)} bytes: sampling needs 1 to "
                         f"model.max_seq_len - 1 = {cfg.model.max_seq_len - 1}")
    max_new = min(max_new, cfg.model.max_seq_len - len(prompt))
    model = setup.model(state["params"], state["rest"])
    tokens = np.frombuffer(prompt, np.uint8).astype(np.int32)[None]
    # only byte ids: a vocabulary padded past 256 (the 1B-scale configs' 32000) printed
    # its other ids wrapped modulo 256, bytes the model never sampled
    out = generate(model, tokens, max_new, rng=jax.random.key(seed),
                   temperature=cfg.eval.temperature, top_k=min(cfg.eval.top_k, 256),
                   top_p=top_p, vocab_limit=256)
    return prompt + bytes(np.asarray(out[0]).astype(np.uint8))


def sample_text(setup: TrainSetup, state, cfg: Config, prompt: str | None = None,
                max_new_tokens: int | None = None, seed: int = 0) -> str:
    """:func:`sample_bytes` as text, each byte that is not valid UTF-8 escaped (``\\xNN``, as
    ``jaxsparse generate`` shows it; U+FFFD hid which byte the model sampled)."""
    return sample_bytes(setup, state, cfg, prompt, max_new_tokens, seed).decode(
        "utf-8", errors="backslashreplace")


class _StopFlag:
    """Set by SIGTERM (a preempted job) or a first SIGINT (Ctrl-C, a notebook's interrupt),
    main thread only, so the loop can save and exit between steps. The first SIGINT restores
    the previous handler, so a second one interrupts at once (a step that never finishes). A
    process that ignores SIGINT (started in the background, or by a parent that ignores it)
    keeps ignoring it."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])

    @property
    def name(self) -> str:
        return "Ctrl-C (SIGINT)" if self.signal == signal.SIGINT else "SIGTERM"

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def process_stream(cfg: Config, setup: TrainSetup):
    """This process's batch stream: of every global batch, the rows its devices hold of
    ``setup.batch_sharding`` (:func:`jaxsparse.parallel.mesh.process_rows`), which is what
    :meth:`TrainSetup.global_batch` assembles; all of them when the batch is not split across
    processes (a tensor or sequence axis spanning them)."""
    span = process_rows(setup.batch_sharding, (cfg.data.batch_size, cfg.data.seq_len))
    return make_stream(cfg, Shard(jax.process_index(), jax.process_count(), span=span))


def train(cfg: Config, workdir: str | Path, *, should_stop: Callable[[int], bool] | None = None,
          sample: bool = True, quiet: bool = False) -> TrainResult:
    """Train ``cfg`` in ``workdir``, resuming from its latest checkpoint if there is one.

    ``should_stop(step)`` (after each completed step) lets a caller interrupt the run the same
    way SIGTERM does: a checkpoint is written at the current step and the call returns.
    """
    validate(cfg)
    cfg = with_absolute_paths(cfg)
    if cfg.train.distributed:
        distributed.initialize()
    workdir = Path(workdir).resolve()
    primary = jax.process_index() == 0
    log = (lambda *a: None) if quiet or not primary else (lambda *a: print(*a, flush=True))

    # a ConfigError naming the mesh, before the workdir is touched
    check_batch_split(cfg, check_mesh(cfg, jax.device_count()))
    mesh = make_mesh(cfg.mesh)
    check_workdir(cfg, workdir)
    setup = TrainSetup(cfg, mesh)
    made = [d for d in (workdir, workdir / "checkpoints") if not d.exists()]  # by this call
    stream = process_stream(cfg, setup)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    ckpt.check_compatible(cfg)

    start = ckpt.latest_step()
    saved = None  # the config of the checkpoint resumed from
    if start is not None:
        state = restore_train_state(ckpt, setup, start)
        log(f"resumed from {workdir}/checkpoints step {start}")
        saved = ckpt.saved_config(start)
        warn_if_the_schedule_moved(saved, cfg, start)
        warn_if_the_data_moved(saved, cfg, start)
        warn_if_the_corpus_moved(ckpt.saved_corpus(start), stream.corpus, cfg, start)
        if start >= cfg.train.steps:
            log(f"the run is already at step {start} >= train.steps={cfg.train.steps}: "
                "nothing to train (raise train.steps to continue it)")
    elif cfg.train.init_from:
        try:
            state = _init_from(setup, cfg, cfg.train.init_from)
        except ConfigError:  # a source that is not a run: leave no empty workdir behind
            ckpt.close()
            for directory in reversed(made):
                try:
                    directory.rmdir()  # only if empty (another process may have removed it)
                except OSError:
                    pass
            raise
        start = 0
        log(f"initialised from {cfg.train.init_from}")
    else:
        state = setup.init()
        start = 0
    # steps skipped before this call (train.nonfinite=skip, and float16's loss-scale
    # overflows): the optimiser's schedule count does not advance on them, so they survive a
    # resume in the checkpoint itself
    skipped_before = start - int(schedule_count(state["opt_state"], start))
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        # config.json describes the run its checkpoints come from: a rerun that trains nothing
        # (it only evaluates) leaves it alone, or restores it from the checkpoint if it is gone
        config_path = workdir / "config.json"
        if start < cfg.train.steps or saved is None:
            config_path.write_text(to_json(cfg))
        elif not config_path.exists():
            config_path.write_text(to_json(saved))
    log(f"config {cfg.name}: {count_params(state['params']):,} parameters, mesh "
        f"{dict(mesh.shape)}, {jax.device_count()} {jax.default_backend()} device(s)")

    train_step, eval_step = make_train_step(setup), make_eval_step(setup)
    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard, resume_step=start)
    losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []
    eval_metrics: dict[str, float] = {}
    skipped: list[int] = []  # steps whose update was not applied (non-finite loss or gradient)
    bad_updates: set[int] = set()  # ... of which the loss and gradient were finite, the update not
    overflows = 0  # float16 steps skipped for a loss scale too high, which then halved
    stop_on_nonfinite = cfg.train.nonfinite == "stop"
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    stopped = False
    step = start
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
               disable=not (primary and cfg.train.progress and not quiet), dynamic_ncols=True,
               file=sys.stdout)
    # tokens/s over the steps since the last log: the clock restarts after the first step
    # (its compilation), and every evaluation and checkpoint save is taken out of its window
    # (off_the_clock), which are not training throughput (the first window of every run read
    # ~1% of the steady rate, the one after a save 3-5x slow); a window of the first step
    # alone reports that step, compilation included
    last_time, last_step = time.perf_counter(), start
    first_step_seconds = last_rate = None
    # lines between bar updates: from one process only (a pod's hosts would all print them),
    # and not at all when the caller asked for quiet
    say = bar.write if primary and not quiet else (lambda *a: None)

    def flush_logs():
        nonlocal last_time, last_step, last_rate, overflows
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        steps_timed = pending[-1][0] + 1 - last_step
        if steps_timed > 0:
            rate = steps_timed * tokens_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, pending[-1][0] + 1
        elif last_rate is None:  # the first step alone: its time, compilation included
            rate = tokens_per_step / max(first_step_seconds, 1e-9)
        else:  # no step since the last log (the logs flushed again): the last rate
            rate = last_rate
        last_rate = rate
        bar.update(pending[-1][0] + 1 - bar.n)
        for (s, _), m in zip(pending, fetched):
            losses[s] = float(m["loss"])
            overflows += int(m.get("scale_overflow", 0))
            if m["nonfinite"]:
                skipped.append(s)
                if m["nonfinite_update"]:
                    bad_updates.add(s)
                    say(f"step {s + 1}: loss {float(m['loss']):.4g} and gradient norm "
                        f"{float(m['grad_norm']):.4g} are finite, but the optimiser's update "
                        "is not; it was not applied")
                else:
                    say(f"step {s + 1}: loss {float(m['loss']):.4g}, gradient norm "
                        f"{float(m['grad_norm']):.4g}: not finite; the update was not applied")
        s, m = pending[-1][0], fetched[-1]
        values = {k: float(v) for k, v in m.items()} | {"tokens_per_sec": rate,
                                                         "skipped_steps": skipped_before + len(skipped) + overflows}
        if cfg.data.task == "text":  # beside eval's, on the same panel of `jaxsparse plot`
            values["bits_per_byte"] = values["loss"] / LN2
        writer.write(s + 1, "train", values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{rate:,.0f}")
        pending.clear()

    def off_the_clock(action):
        """``action()`` with its time left out of the current throughput window: the steps
        before it finish first (they are training time), then the window's start moves on by
        what the action took. (Restarting the clock instead left a window that a stop's save
        ends with no step in it, reported as the compile-dominated first step's rate.)"""
        nonlocal last_time
        jax.block_until_ready(state)
        started = time.perf_counter()
        result = action()
        last_time += time.perf_counter() - started
        return result

    def run_eval(record: bool = True):
        metrics = off_the_clock(lambda: evaluate(setup, eval_step, state, stream, cfg))
        if record:
            writer.write(step, "eval", metrics)
        say(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def save():  # the save waits for the state and copies it to the host: not training time
        off_the_clock(lambda: ckpt.save(step, state, cfg, corpus=stream.corpus, force=True))

    curriculum = cfg.model.hydra_curriculum if cfg.model.name == "hydra" else ""
    stage_list = stages(curriculum)

    def log_stage(at_step):
        index = stage_at(curriculum, at_step)
        first, components = stage_list[index]
        writer.write(at_step, "curriculum", {"stage": index, "first_step": first})
        say(f"step {at_step}: curriculum stage {index} of {len(stage_list) - 1}: "
            f"{', '.join(components)}")

    if len(stage_list) > 1:
        log_stage(start)  # also after a resume: the stage the run continues in
    if start == 0:
        eval_metrics = run_eval()  # the starting point of the curves
    saved_at_stop = False
    with _StopFlag() as flag:
        while step < cfg.train.steps:
            batch = setup.global_batch(stream.batch(step))
            state, metrics = train_step(state, batch)
            if first_step_seconds is None:  # compiled and run: the clock starts after it
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                first_step_seconds, last_time, last_step = now - last_time, now, step + 1
            if pending:
                # Keep one step in flight: the bar then counts finished steps, not dispatches.
                jax.block_until_ready(pending[-1][1])
                bar.update(1)
            pending.append((step, metrics))
            step += 1
            # stop policy: the step that has just finished (a ready scalar, no extra wait)
            finished_bad = (stop_on_nonfinite and len(pending) > 1
                            and bool(pending[-2][1]["nonfinite"]))
            if len(stage_list) > 1 and step < cfg.train.steps and \
                    stage_at(curriculum, step) != stage_at(curriculum, step - 1):
                flush_logs()
                log_stage(step)
            last = step == cfg.train.steps
            if step % cfg.train.log_every == 0 or last or finished_bad:
                flush_logs()
            diverged = stop_on_nonfinite and bool(skipped)
            if (step % cfg.train.eval_every == 0 or last) and not diverged:
                eval_metrics = run_eval()
            interrupted = flag.signal is not None or (should_stop is not None and should_stop(step))
            due = step % cfg.train.checkpoint_every == 0 or last or interrupted
            if due and stop_on_nonfinite and not diverged:
                # a bad step not yet logged (or still in flight) must not be saved over the
                # rotation either; the save waits for the state anyway
                diverged = any(bool(m["nonfinite"]) for _, m in pending)
            if due and not diverged:
                writer.flush()  # what is logged up to a checkpoint survives a kill after it
                save()
            if diverged:
                # The state at the stop is finite (bad updates are never applied), but the
                # updates before the bad one may already have harmed it, and saving it would
                # evict the oldest good checkpoint: it is saved only when there is none.
                saved_at_stop = ckpt.latest_step() is None
                if saved_at_stop:
                    save()
                break
            if interrupted and not last:
                stopped = True
                flush_logs()
                why = flag.name if flag.signal is not None else "a stop request"
                say(f"stopping at step {step} after {why}; checkpoint saved")
                break
    flush_logs()
    if stop_on_nonfinite and skipped:
        kept = ckpt.latest_step()
        bar.close()
        with _StopFlag():  # the run ends with the error below; the save still completes
            ckpt.close()
        writer.close()
        if skipped[0] in bad_updates:
            what = "the loss and gradient were finite but the optimiser's update was not"
            advice = ("Check optimizer.lr and optimizer.eps for values float32 cannot hold (an "
                      "eps that rounds to 0 gives 0/0 where a gradient is zero; an lr above "
                      "~3e38 is inf) and optimizer.weight_decay")
        else:
            what = "the loss or gradient was not finite"
            advice = ("Resume from it with a lower optimizer.lr (or longer "
                      "optimizer.warmup_steps, a smaller optimizer.grad_clip), or set "
                      "train.nonfinite=skip to step over such batches")
        where = (f"the checkpoint of step {kept} in {workdir / 'checkpoints'} (none was written "
                 "before) holds the finite weights at the stop" if saved_at_stop else
                 f"the checkpoint of step {kept} in {workdir / 'checkpoints'}, the latest one, "
                 "is left as it was (the state at the stop is not saved over it)")
        raise NonFiniteTraining(
            f"step {skipped[0] + 1}: {what}, so the run stopped (train.nonfinite='stop'). "
            f"That update was not applied; {where}. {advice}.")
    if not eval_metrics and not stopped:
        # resumed a finished run: its final numbers, not an empty dict; not recorded again (the
        # run recorded its evaluation of this step: a second record showed the step twice)
        eval_metrics = run_eval(record=False)
    bar.close()
    # The loop's handlers end with it, and a preemption arriving while the final save was
    # still being written killed it half-way (a resume went back a checkpoint): held until the
    # save completes. A signal then, or one taken at the last step (the loop ended anyway),
    # stops the run as at any other step: saved, no final sample.
    with _StopFlag() as late:
        ckpt.close()
    held = flag if flag.signal is not None else late
    if held.signal is not None and not stopped:
        stopped = True
        say(f"stopping at step {step} after {held.name}; checkpoint saved")
    writer.close()
    text = None
    if primary and not stopped:  # before the sample: an interrupt there loses nothing
        (workdir / "final_metrics.json").write_text(
            json.dumps({"step": step, **eval_metrics}, indent=2))
    if sample and not stopped and cfg.data.task == "text" and cfg.eval.sample_tokens:
        text = sample_text(setup, state, cfg)
    return TrainResult(step=step, losses=losses, eval_metrics=eval_metrics, stopped_early=stopped,
                       sample=text, state=state, skipped_steps=skipped)


def _init_from(setup: TrainSetup, cfg: Config, source: str):
    """The state of ``setup`` holding the latest weights of the run in ``source`` and its
    learned statistics (routing centroids; :func:`~jaxsparse.train.state.learned_statistics`);
    step, optimiser state and schedule counters start afresh."""
    from flax import nnx

    from jaxsparse.sparsify import convert_params

    try:
        source_cfg, source_setup, source_state = load(source)
    except FileNotFoundError as err:
        raise ConfigError(f"train.init_from={source!r}: {err}") from None
    model = source_setup.model(source_state["params"], source_state["rest"])
    model = convert_params(model, source_cfg.model, cfg.model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    try:
        return setup.init_with_params(params, learned_statistics(model))
    except ValueError as err:
        raise ConfigError(f"train.init_from={source!r}: {err}") from None


def load(workdir: str | Path, step: int | None = None, *, mesh: MeshConfig | None = None,
         devices=None):
    """``(cfg, setup, state)`` of the latest (or given) checkpoint in ``workdir``.

    By default the state comes back on one device. ``mesh`` (with ``devices``, default all)
    restores it onto another mesh and sharding preset than the one it was written from — e.g.
    saved with ``fsdp=8`` on 8 devices, restored as ``data=2 x tensor=2`` on 4: orbax reads
    every array straight into the new shards (the abstract target carries the shardings).
    A mesh this model cannot use (axis sizes that do not fit the devices, a tensor axis that
    does not divide the heads, an expert axis without experts) is refused with a ConfigError
    before anything is read; one whose data axes do not split the run's ``data.batch_size``
    is loaded with a ``SettingsWarning`` (its batch sharding then replicates the batch).

    ``cfg`` is the one saved with that checkpoint, the settings it was trained with:
    ``config.json`` holds the latest run's, and a resume may have changed its data, evaluation
    or schedule settings since (evaluated with those, an older step gave other numbers than
    its own run recorded)."""
    workdir = Path(workdir).resolve()
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json; is it a jaxsparse workdir?")
    cfg = read_config(config_path)
    if not (workdir / "checkpoints").is_dir():  # (the Checkpointer would create it: a reader)
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=False)
    latest = ckpt.latest_step() if step is None else step
    if latest is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    if latest in ckpt.manager.all_steps():  # (else restore names the steps there are)
        cfg = _checkpoint_settings(ckpt.saved_config(latest), cfg, latest, config_path)
    if mesh is None:
        mesh, devices = MeshConfig(), jax.devices()[:1]
    devices = jax.devices() if devices is None else devices
    cfg = validate(dataclasses.replace(cfg, mesh=mesh))
    sizes = check_mesh(cfg, len(devices))  # raises a ConfigError naming the mesh
    try:
        check_batch_split(cfg, sizes)
    except ConfigError as err:  # legal for other batches (generation), but train would refuse
        warnings.warn(f"{err}: the setup's batch sharding (evaluate, global_batch) keeps the "
                      "whole batch on every device, no data parallelism", SettingsWarning,
                      stacklevel=2)
    setup = TrainSetup(cfg, make_mesh(cfg.mesh, devices))
    state = restore_train_state(ckpt, setup, latest)
    ckpt.close()
    return cfg, setup, state


def _checkpoint_settings(saved: Config | None, recorded: Config, step: int,
                         config_path: Path) -> Config:
    """The settings to evaluate the checkpoint of ``step`` with: those saved with it (None:
    a checkpoint without them, then ``config.json``'s). Where ``config.json`` (the latest
    run's, or edited by hand, e.g. a moved ``data.path``) says otherwise for the data,
    evaluation or model, that is said, each key with both values."""
    if saved is None:
        return recorded
    differences = diff(saved, recorded, ("model", "data", "eval"))
    if differences:
        warnings.warn(f"evaluating the checkpoint of step {step} with the settings saved with "
                      f"it; {config_path} (the latest run's) differs: "
                      f"{'; '.join(differences)}", DataChangeWarning, stacklevel=3)
    return saved


def restore_train_state(ckpt: Checkpointer, setup: TrainSetup, step: int):
    """The train state saved at ``step``, for ``setup``'s model, also where ``model.dtype``
    changed to or from float16 since (a key that only chooses how the model is computed): a
    float16 state holds its loss scale (:mod:`jaxsparse.train.loss_scale`), which then starts
    afresh, or is dropped."""
    abstract = dict(setup.abstract_state)
    wanted = "loss_scale" in abstract
    saved = ckpt.saved_state_keys(step)
    if saved is not None and ("loss_scale" in saved) != wanted:
        if wanted:
            del abstract["loss_scale"]
        else:
            replicated = NamedSharding(setup.mesh, PartitionSpec())
            abstract["loss_scale"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                jax.eval_shape(initial_loss_scale))
    state = ckpt.restore(abstract, step)
    if wanted and "loss_scale" not in state:
        state["loss_scale"] = jax.device_put(initial_loss_scale(),
                                             setup.state_shardings["loss_scale"])
    if not wanted:
        state.pop("loss_scale", None)
    return state
