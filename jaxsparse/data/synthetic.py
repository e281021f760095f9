"""Synthetic sequence tasks for model studies; each example comes with a loss mask.

All generators are deterministic functions of a numpy ``Generator`` and return int32
``inputs``/``targets`` ``[batch, seq_len]`` (targets are inputs shifted by one) and a float32
``mask`` that is 1 exactly on the answer tokens, so accuracy counts answers only.
Token 0 is a blank/pad token in every task.
"""

from __future__ import annotations

import numpy as np


def _shift(seq: np.ndarray, answer: np.ndarray) -> dict[str, np.ndarray]:
    """seq ``[B, L+1]``, answer bool ``[B, L+1]`` (position is an answer token)."""
    return {
        "inputs": seq[:, :-1].astype(np.int32),
        "targets": seq[:, 1:].astype(np.int32),
        "mask": answer[:, 1:].astype(np.float32),
    }


def mqar_min_vocab(num_kv_pairs: int) -> int:
    """Smallest vocabulary MQAR can draw ``num_kv_pairs`` distinct keys and values from (keys
    from the lower half, values from the upper, token 0 kept for the filler)."""
    return 2 * num_kv_pairs + 2


def mqar_min_seq_len(num_kv_pairs: int) -> int:
    """Shortest sequence that holds the opening pairs and one query-answer per pair."""
    return 4 * num_kv_pairs - 1


def _check_batch(task: str, batch: int) -> None:
    """A batch size is an integer >= 0 (0 gives empty arrays)."""
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 0:
        raise ValueError(f"{task}: batch={batch!r} must be an integer >= 0")


def check_mqar(seq_len: int, vocab_size: int, num_kv_pairs: int, filler: str = "zero") -> None:
    """Raise ``ValueError`` for sizes :func:`mqar` cannot draw from."""
    if filler not in ("zero", "random"):
        raise ValueError(f"mqar: filler={filler!r}: allowed 'zero' or 'random'")
    n = num_kv_pairs
    if n < 1:
        raise ValueError(f"mqar: num_kv_pairs={n} must be >= 1 (the answers are the values of "
                         "the queried keys)")
    if vocab_size < mqar_min_vocab(n):
        raise ValueError(f"mqar: vocab_size={vocab_size} too small for num_kv_pairs={n} "
                         f"(need >= 2 * num_kv_pairs + 2 = {mqar_min_vocab(n)}: keys and values "
                         "are drawn from separate halves)")
    if seq_len < mqar_min_seq_len(n):
        raise ValueError(f"mqar: seq_len={seq_len} too short for num_kv_pairs={n} "
                         f"(need >= {mqar_min_seq_len(n)})")


def mqar(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
         num_kv_pairs: int, *, filler: str = "zero") -> dict[str, np.ndarray]:
    """Multi-query associative recall (Arora et al. 2023, "Zoology").

    The sequence opens with ``num_kv_pairs`` key-value pairs (keys from the lower half of the
    vocabulary, values from the upper half, keys distinct within an example); afterwards every
    key is queried once at a random position and the model must produce its value next.
    ``filler`` fills the other positions: ``"zero"`` (token 0) or ``"random"`` (uniform over
    the vocabulary, as Zoology does: no single filler token that, e.g., every routing cluster
    or state update must learn to ignore).
    """
    check_mqar(seq_len, vocab_size, num_kv_pairs, filler)
    _check_batch("mqar", batch)
    n = num_kv_pairs
    half = vocab_size // 2
    keys = np.zeros((batch, n), np.int64)  # batch 0: empty arrays, as the other tasks give
    for b in range(batch):
        keys[b] = rng.choice(np.arange(1, half), n, replace=False)
    values = rng.integers(half, vocab_size, size=(batch, n))
    seq = np.zeros((batch, seq_len + 1), np.int64)
    answer = np.zeros_like(seq, dtype=bool)
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
    # Query slots: pairs of positions (p, p+1) after the context, chosen without overlap.
    slots = (seq_len + 1 - 2 * n) // 2
    for b in range(batch):
        chosen = 2 * n + 2 * np.sort(rng.choice(slots, n, replace=False))
        order = rng.permutation(n)
        seq[b, chosen], seq[b, chosen + 1] = keys[b, order], values[b, order]
        answer[b, chosen + 1] = True
    if filler == "random":
        free = np.ones_like(answer)
        free[:, :2 * n] = False
        free[answer] = False
        free[np.roll(answer, -1, axis=1)] = False  # the query keys
        seq[free] = rng.integers(0, vocab_size, size=int(free.sum()))
    return _shift(seq, answer)


def check_selective_copying(seq_len: int, vocab_size: int, num_tokens_to_copy: int) -> None:
    """Raise ``ValueError`` for sizes :func:`selective_copying` cannot draw from."""
    n = num_tokens_to_copy
    if n < 1:
        raise ValueError(f"selective_copying: num_tokens_to_copy={n} must be >= 1 (the tokens "
                         "to copy are the only targets)")
    if seq_len < 2 * n:
        raise ValueError(
            f"selective_copying: seq_len={seq_len} too short for num_tokens_to_copy={n} "
            f"(need >= {2 * n})")
    if vocab_size < 3:
        raise ValueError(f"selective_copying: vocab_size={vocab_size} must be >= 3")


def selective_copying(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
                      num_tokens_to_copy: int) -> dict[str, np.ndarray]:
    """Selective copying (Gu & Dao 2023, Mamba, section 4.1.1).

    ``num_tokens_to_copy`` data tokens sit at random positions among blanks (0); after a
    separator (1) the model must emit the data tokens in order.
    """
    check_selective_copying(seq_len, vocab_size, num_tokens_to_copy)
    _check_batch("selective_copying", batch)
    n = num_tokens_to_copy
    region = seq_len - n
    data = rng.integers(2, vocab_size, size=(batch, n))
    seq = np.zeros((batch, seq_len + 1), np.int64)
    for b in range(batch):
        seq[b, np.sort(rng.choice(region, n, replace=False))] = data[b]
    seq[:, region] = 1
    seq[:, region + 1:] = data
    answer = np.zeros_like(seq, dtype=bool)
    answer[:, region + 1:] = True
    return _shift(seq, answer)


def check_induction_heads(seq_len: int, vocab_size: int, prefix_len: int) -> None:
    """Raise ``ValueError`` for sizes :func:`induction_heads` cannot draw from."""
    if prefix_len < 2:
        raise ValueError(f"induction_heads: prefix_len={prefix_len} must be >= 2 (a period of "
                         "one token is a constant sequence)")
    if seq_len + 1 < 2 * prefix_len:
        raise ValueError(f"induction_heads: seq_len={seq_len} too short for prefix_len="
                         f"{prefix_len} (need >= {2 * prefix_len - 1}: the longest prefix "
                         "repeated once)")
    if vocab_size < prefix_len + 1:
        raise ValueError(f"induction_heads: vocab_size={vocab_size} too small for prefix_len="
                         f"{prefix_len} (need >= {prefix_len + 1}: a prefix's "
                         "tokens are distinct, so each has one successor to copy)")


def induction_heads(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
                    prefix_len: int) -> dict[str, np.ndarray]:
    """A random prefix repeated to the end of the row (the repeated random tokens of Olsson et
    al. 2022): a scored token is the successor of the current token's previous occurrence.

    What keeps it a lookup, not a copy at a fixed lag: each row draws its own period, uniformly
    from ``prefix_len // 2 + 1`` to ``prefix_len`` (a copy at any one lag is right on about one
    row in ``prefix_len - prefix_len // 2``); the prefix's tokens are distinct (drawn without
    replacement from ``1 .. vocab_size - 1``), so every token has exactly one successor; and the
    first target of the repeat, whose input (the prefix's last token) has not occurred before,
    is not scored."""
    check_induction_heads(seq_len, vocab_size, prefix_len)
    _check_batch("induction_heads", batch)
    periods = rng.integers(prefix_len // 2 + 1, prefix_len + 1, size=batch)
    seq = np.zeros((batch, seq_len + 1), np.int64)
    answer = np.zeros_like(seq, dtype=bool)
    for b, period in enumerate(periods):
        prefix = rng.choice(vocab_size - 1, size=period, replace=False) + 1
        seq[b] = np.resize(prefix, seq_len + 1)  # repeats prefix to the length
        answer[b, period + 1:] = True
    return _shift(seq, answer)


QUERY = 1  # multi-hop: the token that opens a query


def check_multi_hop(seq_len: int, vocab_size: int, hops: int, chains: int) -> None:
    """Raise ``ValueError`` for sizes :func:`multi_hop` cannot draw from."""
    if hops < 1 or chains < 1:
        raise ValueError(f"multi_hop: hops={hops} and chains={chains} must be >= 1")
    n_names = hops * chains
    if vocab_size // 2 - 2 < n_names:
        raise ValueError(f"multi_hop: vocab_size={vocab_size} too small for hops·chains="
                         f"{n_names} distinct variables (need >= {2 * (n_names + 2)})")
    if seq_len + 1 < 2 * n_names + 3 * chains:
        raise ValueError(f"multi_hop: seq_len={seq_len} too short for hops={hops}, chains="
                         f"{chains} (need >= {2 * n_names + 3 * chains - 1})")


def multi_hop(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
              hops: int, chains: int) -> dict[str, np.ndarray]:
    """Multi-step composition: chains of variable assignments, shuffled, then queries.

    Each of ``chains`` chains binds a value to a first variable and each next variable to the
    previous one — ``(n1, v), (n2, n1), ..., (n_hops, n_{hops-1})``, a pair ``(a, b)`` reading
    "a := b" — and the ``hops · chains`` pairs appear in random order. Then, after the
    statements, every chain's last variable is queried as ``QUERY n_hops`` at a random
    position, and the answer is ``v``: resolving it takes ``hops`` look-ups, each depending on
    the one before (``hops = 1`` is plain associative recall). Variables are drawn from
    ``[2, vocab/2)`` (distinct within an example), values from ``[vocab/2, vocab)``.
    """
    check_multi_hop(seq_len, vocab_size, hops, chains)
    _check_batch("multi_hop", batch)
    n_names = hops * chains
    half = vocab_size // 2
    statements = 2 * n_names
    seq = np.zeros((batch, seq_len + 1), np.int64)
    answer = np.zeros_like(seq, dtype=bool)
    slots = (seq_len + 1 - statements) // 3
    for b in range(batch):
        names = rng.choice(np.arange(2, half), n_names, replace=False).reshape(chains, hops)
        values = rng.integers(half, vocab_size, size=chains)
        sources = np.concatenate([values[:, None], names[:, :-1]], axis=1)  # n_i := source_i
        pairs = np.stack([names.ravel(), sources.ravel()], axis=1)[rng.permutation(n_names)]
        seq[b, :statements] = pairs.ravel()
        starts = statements + 3 * np.sort(rng.choice(slots, chains, replace=False))
        order = rng.permutation(chains)
        seq[b, starts], seq[b, starts + 1], seq[b, starts + 2] = QUERY, names[order, -1], values[order]
        answer[b, starts + 2] = True
    return _shift(seq, answer)
