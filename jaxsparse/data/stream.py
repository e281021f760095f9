"""Batch streams that are pure functions of (seed, step).

A resumed run therefore sees exactly the batches an uninterrupted run would, and every
process computes the same global batch layout but reads only its own rows (:class:`Shard`:
those its devices hold of the batch sharding).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsparse.config import Config, ConfigError, DataConfig, validate_data
from jaxsparse.config_usage import TASK_KEYS
from jaxsparse.data import corpus, store, synthetic

# keeps synthetic evaluation batches disjoint from this run's training (a run whose data.seed
# is this one's + the offset trains on them: config.DataConfig.seed says so)
_EVAL_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class Shard:
    """The rows of every global batch that this process reads.

    ``Shard(index, count)``: process ``index`` of ``count`` reads the ``index``-th of ``count``
    equal parts (a batch split over the processes and nothing else). ``span=(start, stop)``
    overrides that with exactly the rows ``[start, stop)``: those the process's devices hold
    of the batch sharding (:func:`jaxsparse.parallel.mesh.process_rows`), every row when the
    batch is not split across processes (e.g. a tensor or sequence axis that spans them). Either way every process slices one global batch drawn
    from ``(seed, step)``, so the batch does not depend on the process layout."""

    index: int = 0
    count: int = 1
    span: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("index", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"Shard: {name}={value!r} must be an integer")
        if self.count < 1:
            raise ValueError(f"Shard: count={self.count} processes: must be >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"Shard: index={self.index} must be in [0, count={self.count}) "
                             "(the process's index among the count processes)")
        if self.span is not None:
            if (not isinstance(self.span, tuple | list) or len(self.span) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int | np.integer)
                           for v in self.span)):
                raise ValueError(f"Shard: span={self.span!r} must be a pair of integers "
                                 "(start, stop): the rows [start, stop) of the global batch")
            start, stop = self.span
            if not 0 <= start < stop:
                raise ValueError(f"Shard: span={self.span}: the rows [start, stop) need "
                                 "0 <= start < stop")

    def rows(self, global_batch: int) -> slice:
        if self.span is not None:
            start, stop = self.span
            if stop > global_batch:
                raise ConfigError(f"data.batch_size={global_batch}: this process's rows "
                                  f"[{start}, {stop}) reach past the global batch")
            return slice(start, stop)
        if global_batch % self.count:
            raise ConfigError(
                f"data.batch_size={global_batch} is not divisible by the {self.count} processes")
        per = global_batch // self.count
        return slice(self.index * per, (self.index + 1) * per)


def check_data(cfg: Config) -> None:
    """:func:`jaxsparse.config.validate_data` on the keys a stream of ``cfg.data.task`` reads
    (the others at their defaults: a text stream never asks for the MQAR keys), so a stream
    built from an unvalidated config gets validate's errors, naming each key, instead of empty
    batches (``batch_size=0``), a tensorstore IndexError (``seq_len=-5``) or a
    ZeroDivisionError (``valid_every=0``)."""
    d = cfg.data
    read = {"task", "batch_size", "seq_len", "seed", *TASK_KEYS.get(d.task, ())}
    validate_data(cfg.model, DataConfig(**{name: getattr(d, name) for name in read}))


def document_ids(inputs: np.ndarray) -> np.ndarray:
    """int32 ids per token: a new document starts after every NUL (the separator
    :func:`jaxsparse.data.store.tokenize_files` puts after each file), so the NUL ends its file's
    document and the next byte opens the next one."""
    ends = np.cumsum(inputs == 0, axis=1)
    return np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1).astype(np.int32)


class TextStream:
    """Random windows of ``seq_len + 1`` bytes from the train split; fixed windows for eval."""

    def __init__(self, cfg: Config, shard: Shard = Shard()):
        d = cfg.data
        root, files = corpus.corpus_files(d.path, exclude=store.cache_dir_of(d.cache_dir))
        splits = corpus.split_files(root, files, d.valid_every)
        self.train = store.open_tokens(splits["train"], d.cache_dir)
        self.valid = store.open_tokens(splits["valid"], d.cache_dir)
        self.seq_len, self.batch_size, self.seed, self.shard = d.seq_len, d.batch_size, d.seed, shard
        self.packed_documents = d.packed_documents
        self.num_files = {k: len(v) for k, v in splits.items()}
        # what the glob matched, saved with every checkpoint: a resume on a corpus that gained
        # or lost files (or bytes) draws other windows under the same settings, and says so
        self.corpus = {name: {"files": self.num_files[name], "bytes": int(arr.shape[0])}
                       for name, arr in (("train", self.train), ("valid", self.valid))}
        for name, arr in (("train", self.train), ("valid", self.valid)):
            if arr.shape[0] < self.seq_len + 1:  # one window: seq_len inputs + the last target
                raise ConfigError(
                    f"the {name} split holds {arr.shape[0]} bytes, fewer than data.seq_len+1="
                    f"{self.seq_len + 1}; use more text or a shorter data.seq_len")

    def _windows(self, arr, offsets):
        w = store.read_windows(arr, offsets[self.shard.rows(len(offsets))], self.seq_len + 1)
        w = w.astype(np.int32)
        batch = {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": np.ones(w[:, 1:].shape, np.float32)}
        if self.packed_documents:
            batch["segment_ids"] = document_ids(batch["inputs"])
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        # a window of seq_len + 1 bytes may start at 0 .. N - seq_len - 1 (the bound is exclusive)
        offsets = rng.integers(0, self.train.shape[0] - self.seq_len, size=self.batch_size)
        return self._windows(self.train, offsets)

    def eval_batch(self, index: int, num_batches: int) -> dict[str, np.ndarray]:
        """Evenly spaced validation windows: batch ``index`` of ``num_batches``."""
        total = num_batches * self.batch_size
        starts = np.linspace(0, self.valid.shape[0] - self.seq_len - 1, total).astype(np.int64)
        return self._windows(self.valid, starts[index * self.batch_size:(index + 1) * self.batch_size])


class SyntheticStream:
    """One of :mod:`jaxsparse.data.synthetic`'s tasks, batch by batch."""

    def __init__(self, cfg: Config, shard: Shard = Shard()):
        d = cfg.data
        self.cfg, self.shard = cfg, shard
        self.batch_size, self.seed = d.batch_size, d.seed
        self.corpus = None  # drawn from the settings alone
        self._make(np.random.default_rng(0), 1)  # validate the task parameters up front

    def _make(self, rng, batch):
        d, vocab = self.cfg.data, self.cfg.model.vocab_size
        if d.task == "mqar":
            return synthetic.mqar(rng, batch, d.seq_len, vocab, d.num_kv_pairs,
                                  filler=d.mqar_filler)
        if d.task == "selective_copying":
            return synthetic.selective_copying(rng, batch, d.seq_len, vocab, d.num_tokens_to_copy)
        if d.task == "induction_heads":
            return synthetic.induction_heads(rng, batch, d.seq_len, vocab, d.induction_prefix)
        if d.task == "multi_hop":
            return synthetic.multi_hop(rng, batch, d.seq_len, vocab, d.hops, d.chains)
        raise ConfigError(f"data.task={d.task!r} is not a synthetic task")

    def _local(self, seed_parts):
        full = self._make(np.random.default_rng(seed_parts), self.batch_size)
        rows = self.shard.rows(self.batch_size)
        return {k: v[rows] for k, v in full.items()}

    def batch(self, step: int):
        return self._local([self.seed, step])

    def eval_batch(self, index: int, num_batches: int):
        return self._local([self.seed + _EVAL_SEED_OFFSET, index])


def make_stream(cfg: Config, shard: Shard = Shard()):
    """The batch stream of ``cfg.data`` (checked first, :func:`check_data`), reading the rows
    ``shard`` names of every global batch."""
    check_data(cfg)
    return TextStream(cfg, shard) if cfg.data.task == "text" else SyntheticStream(cfg, shard)
