"""Batch streams that are pure functions of (seed, step).

A resumed run therefore sees exactly the batches an uninterrupted run would, and every
process computes the same global batch layout but reads only its own rows
(``jax.process_index()`` of ``jax.process_count()``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsparse.config import Config, ConfigError
from jaxsparse.data import corpus, store, synthetic

_EVAL_SEED_OFFSET = 1_000_003  # keeps synthetic evaluation batches disjoint from training


@dataclasses.dataclass
class Shard:
    index: int = 0
    count: int = 1

    def rows(self, global_batch: int) -> slice:
        if global_batch % self.count:
            raise ConfigError(
                f"data.batch_size={global_batch} is not divisible by the {self.count} processes")
        per = global_batch // self.count
        return slice(self.index * per, (self.index + 1) * per)


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
        root, files = corpus.corpus_files(d.path)
        splits = corpus.split_files(root, files, d.valid_every)
        self.train = store.open_tokens(splits["train"], d.cache_dir)
        self.valid = store.open_tokens(splits["valid"], d.cache_dir)
        self.seq_len, self.batch_size, self.seed, self.shard = d.seq_len, d.batch_size, d.seed, shard
        self.packed_documents = d.packed_documents
        self.num_files = {k: len(v) for k, v in splits.items()}
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
    return TextStream(cfg, shard) if cfg.data.task == "text" else SyntheticStream(cfg, shard)
