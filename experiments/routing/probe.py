"""Can a routing query reach the key it needs? A probe of a trained MQAR routing run.

In multi-query associative recall the answer to a query ``k`` is the token after ``k``'s first
occurrence (position ``2i + 1`` of the opening key-value pairs). A routing head can answer only
if that position is among the keys its cluster window lets the query read. This probe runs a
trained routing model on validation batches and reports, for every routing layer and head,
the share of answer positions whose window holds the value position (``reach``), beside the
share expected if the window were ``probes · w`` keys drawn at random from the query's past
(``chance``), and the share of the ``probes · w`` window slots in use at answer positions
(``fill``). The last row (``model``, ``accuracy``) is the share of those answers the model gets
right — any MQAR run, full attention included, so that runs can be compared on more answers
than a training run's evaluation holds (``--batches 32`` of the study's 8 sequences with 4 pairs:
1024 answers, a standard error of about 1.5%).
The layer inputs come from running the blocks in order (Transformer-style models, as the
routing transformer is; the model has no hook for them).

    python experiments/routing/probe.py WORKDIR [--batches 32] [--probes P]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse.bench.arguments import positive_int
from jaxsparse.data.stream import make_stream
from jaxsparse.nn import RoutingAttention
from jaxsparse.train.loop import load


def value_positions(inputs: np.ndarray, mask_rows: np.ndarray, pairs: int) -> np.ndarray:
    """``[B, L]`` position of the value each answer needs (``-1`` where no answer is due): the
    query token at ``t`` is a key; its value sits right after the key's opening occurrence."""
    keys = inputs[:, 0:2 * pairs:2]                                   # [B, pairs]
    match = inputs[:, :, None] == keys[:, None, :]                    # [B, L, pairs]
    which = np.argmax(match, axis=-1)
    return np.where(mask_rows > 0, 2 * which + 1, -1)


def routing_layers(model):
    return [(i, block) for i, block in enumerate(model.blocks)
            if isinstance(block.attn, RoutingAttention)]


def probe(workdir: str, batches: int = 4, probes: int | None = None) -> list[dict]:
    """Reach, chance and fill per routing head and the model's answer accuracy (module
    docstring); ``probes``: evaluate with this many clusters per query instead of the trained
    ``model.routing_probes`` (e.g. every cluster, to ask whether reach or binding limits)."""
    cfg, setup, state = load(workdir)
    if cfg.data.task != "mqar":
        raise ValueError(f"{workdir}: data.task={cfg.data.task!r}; the probe needs an MQAR run")
    model = setup.model(state["params"], state["rest"])
    model.eval()
    if probes is not None:
        for _, block in routing_layers(model):
            block.attn.probes = probes
    stream = make_stream(cfg)

    @nnx.jit
    def windows(model, tokens):
        """Key windows of every routing layer for ``tokens`` (the layer inputs from a forward
        pass through the blocks below)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, out = model.embed(tokens), []
        for block in model.blocks:
            if isinstance(block.attn, RoutingAttention):
                out.append(block.attn.windows(block.attn_norm(x)))
            x, _ = block(x, positions)
        return out

    predict = nnx.jit(lambda model, tokens: jnp.argmax(model(tokens), axis=-1))
    stats: dict[int, dict[str, list]] = {}
    correct = []
    for b in range(batches):
        batch = stream.eval_batch(b, 1)
        inputs, answer = np.asarray(batch["inputs"]), np.asarray(batch["mask"])
        guess = np.asarray(predict(model, jnp.asarray(inputs)))
        correct.append((guess == np.asarray(batch["targets"]))[answer > 0])
        need = value_positions(inputs, answer, cfg.data.num_kv_pairs)  # [B, L]
        rows = need >= 0
        t = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
        for (layer, block), (key_pos, valid) in zip(routing_layers(model),
                                                   windows(model, jnp.asarray(inputs))):
            key_pos, valid = np.asarray(key_pos), np.asarray(valid)
            hit = np.any((key_pos == need[:, :, None, None]) & valid, axis=-1)  # [B, L, H]
            s = stats.setdefault(layer, {"hit": [], "any": [], "chance": [], "fill": []})
            s["hit"].append(hit[rows])                                         # [n, H]
            s["any"].append(np.any(hit, axis=-1)[rows])
            read = block.attn.window * block.attn.probes
            s["chance"].append(np.minimum(read / (t[rows] + 1.0), 1.0))
            s["fill"].append(valid[rows].mean(axis=-1))
    table = []
    for layer, s in stats.items():
        hit = np.concatenate(s["hit"])
        for h in range(hit.shape[1]):
            table.append({"layer": layer, "head": h, "reach": float(hit[:, h].mean()),
                          "chance": float(np.concatenate(s["chance"]).mean()),
                          "fill": float(np.concatenate(s["fill"])[:, h].mean())})
        table.append({"layer": layer, "head": "any",
                      "reach": float(np.concatenate(s["any"]).mean()),
                      "chance": float("nan"), "fill": float("nan")})
    answers = np.concatenate(correct)
    table.append({"layer": "model", "head": "accuracy", "reach": float(answers.mean()),
                  "chance": float("nan"), "fill": float("nan"), "answers": int(answers.size)})
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--batches", type=positive_int, default=4,
                        help="validation batches to run (each of the run's data.batch_size)")
    parser.add_argument("--probes", type=positive_int, default=None,
                        help="clusters per routing query at evaluation (default: as trained)")
    args = parser.parse_args(argv)
    table = probe(args.workdir, args.batches, args.probes)
    print("| layer | head | reach | chance | fill |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['layer']} | {r['head']} | {r['reach']:.3f} | {r['chance']:.3f} | "
              f"{r['fill']:.3f} |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
