"""Routing attention: exact cluster windows against a brute-force loop, causality (future
perturbation, the paper's top-w leak shown), balanced clusters, centroid learning, the
RoutingTransformer (decoding, training through the CLI) and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, routing_jit, tiny_config

from jaxsparse import configs
from jaxsparse.config import ConfigError, apply_overrides, validate
from jaxsparse.models.registry import build
from jaxsparse.nn import RoutingAttention
from jaxsparse.nn.intermediates import run_capturing
from jaxsparse.nn.routing import Centroids, routing_statistics
from jaxsparse.ops.routing import (assign, balanced_clusters, balanced_routing_attention,
                                   causal_routing_attention, causal_routing_decode,
                                   commitment_loss, ema_centroids, ema_mean, init_centroids,
                                   normalize, routing_units, routing_windows, shared_keys)
from jaxsparse.train.loop import train

ROUTING = ["model.name=routing_transformer", "model.n_kv_heads=4", "model.routing_heads=2",
           "model.routing_clusters=4", "model.routing_window=8", "model.routing_local_window=8",
           "model.routing_skip_first=1"]

# compiled: op by op one call took 1-3 s
balanced_jit = jax.jit(balanced_routing_attention, static_argnames=("window", "causal"))


def qkv(key, b=2, length=64, heads=2, dim=16):
    ks = jax.random.split(key, 3)
    return [jax.random.normal(k, (b, length, heads, dim)) for k in ks]


def brute_force(q, k, v, centroids, window, shared_qk=False, q_center=None, k_center=None,
                probes=1):
    """Query t attends to the last `window` keys j <= t of each of its `probes` most similar
    clusters (a token's own key only if it is alone, with shared QK), by explicit loops;
    clusters of the centred directions (x - center) when centres are given."""
    if shared_qk:
        k, k_center = shared_keys(q), q_center
    q_route = q if q_center is None else q - q_center[None, None]
    k_route = (normalize(q) if shared_qk else k) if k_center is None else \
        (q if shared_qk else k) - k_center[None, None]
    scores = np.einsum("blhd,hcd->blhc", np.asarray(normalize(q_route)), np.asarray(centroids))
    cq = np.argsort(-scores, axis=-1, kind="stable")[..., :probes]  # best clusters first
    ck = np.asarray(assign(normalize(k_route), centroids))
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, length, heads, dim = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(heads):
            for t in range(length):
                keys = sorted(sum(([j for j in range(t + 1) if ck[bi, j, h] == c][-window:]
                                   for c in cq[bi, t, h]), []))
                if shared_qk and len(keys) > 1:
                    keys = [j for j in keys if j != t]
                if not keys:
                    continue
                logits = np.array([q[bi, t, h] @ k[bi, j, h] for j in keys]) / np.sqrt(dim)
                p = np.exp(logits - logits.max())
                out[bi, t, h] = (p / p.sum()) @ v[bi, keys, h]
    return out


@pytest.mark.parametrize("length,clusters,window,shared_qk,centred,probes", [
    (64, 8, 8, False, False, 1), (37, 3, 5, False, False, 1), (1, 2, 4, False, False, 1),
    (50, 4, 16, True, False, 1), (45, 5, 6, False, True, 1), (33, 4, 8, True, True, 1),
    (64, 8, 5, False, False, 2), (41, 5, 3, True, True, 3), (29, 3, 4, False, True, 3),
    (1, 2, 4, False, False, 2)])
def test_causal_routing_equals_the_brute_force_definition(length, clusters, window, shared_qk,
                                                          centred, probes):
    q, k, v = qkv(jax.random.key(length), length=length)
    centroids = init_centroids(jax.random.key(1), 2, clusters, 16)
    centers = {}
    if centred:  # centres large enough to change most assignments
        cq, ck = jax.random.normal(jax.random.key(2), (2, 2, 16))
        centers = {"q_center": cq, "k_center": ck}
    out, routing = routing_jit(q, k, v, centroids, window=window, shared_qk=shared_qk,
                               probes=probes, **centers)
    np.testing.assert_allclose(out, brute_force(q, k, v, centroids, window, shared_qk,
                                                probes=probes, **centers), atol=2e-5)
    assert routing["q_clusters"].shape == (2, length, 2)
    key_pos, valid = jax.jit(routing_windows, static_argnames=("window", "shared_qk", "probes"))(
        q, k, centroids, window=window, shared_qk=shared_qk, probes=probes, **centers)
    assert key_pos.shape == valid.shape == (2, length, 2, probes * window)
    np.testing.assert_array_equal(jnp.sum(valid, axis=-1), routing["keys_read"])
    if centred:
        plain = routing_jit(q, k, v, centroids, window=window, shared_qk=shared_qk)[1]
        assert float(jnp.mean(plain["q_clusters"] != routing["q_clusters"])) > 0.3


def assert_decodes_like_forward(model, tokens, full, pieces):
    """Decoding ``tokens`` in pieces of the given ``(start, size)`` from a cache gives the
    logits of the full forward pass ``full``."""
    cache = model.init_cache(tokens.shape[0], 32)
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))  # op by op, a model's decode took ~10 s
    out = []
    for start, size in pieces:
        logits, cache = decode(model, tokens[:, start:start + size], cache)
        out.append(logits)
    np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, atol=1e-4, rtol=1e-4)


def assert_causal_and_decodes_like_forward(model, tokens, cut, pieces):
    """Changing the tokens from ``cut`` on leaves every logit before ``cut`` unchanged, and
    decoding in ``pieces`` equals the forward pass; returns the forward logits."""
    forward = jax.jit(model.__call__)
    full = forward(tokens)
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % 256)
    np.testing.assert_array_equal(forward(changed)[:, :cut], full[:, :cut])
    assert_decodes_like_forward(model, tokens, full, pieces)
    return full


def _perturb_after(t, arrays, key):
    return [a.at[:, t + 1:].set(jax.random.normal(k, a[:, t + 1:].shape))
            for a, k in zip(arrays, jax.random.split(key, len(arrays)))]


def test_causal_routing_never_sees_the_future_but_top_w_balancing_does():
    q, k, v = qkv(jax.random.key(3), length=96)
    centroids = init_centroids(jax.random.key(4), 2, 8, 16)
    routed = {probes: jax.jit(lambda q, k, v, probes=probes: causal_routing_attention(
        q, k, v, centroids, window=12, probes=probes)[0]) for probes in (1, 3)}
    for t in (0, 17, 50, 94):
        q2, k2, v2 = _perturb_after(t, [q, k, v], jax.random.key(t))
        for probes in (1, 3):
            ours, ours2 = routed[probes](q, k, v), routed[probes](q2, k2, v2)
            np.testing.assert_array_equal(ours[:, :t + 1], ours2[:, :t + 1])
    # The paper's top-w clusters, masked by position inside each cluster, still leak: which
    # past tokens a centroid keeps depends on how similar the later tokens are to it.
    q2, k2, v2 = _perturb_after(40, [q, k, v], jax.random.key(99))
    top_w = balanced_jit(q, k, v, centroids, window=12, causal=True)[0]
    top_w2 = balanced_jit(q2, k2, v2, centroids, window=12, causal=True)[0]
    assert float(jnp.abs(top_w[:, :41] - top_w2[:, :41]).max()) > 1e-3


def test_balanced_clusters_hold_exactly_w_distinct_members():
    q, _, _ = qkv(jax.random.key(5), length=64)
    centroids = init_centroids(jax.random.key(6), 2, 8, 16)
    members = np.asarray(balanced_clusters(normalize(q), centroids, 8))
    assert members.shape == (2, 2, 8, 8)
    for row in members.reshape(-1, 8):
        assert len(set(row.tolist())) == 8
    q, k, v = qkv(jax.random.key(7), length=64)
    out, routing = balanced_jit(q, k, v, centroids, window=8)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()


def test_ema_reaches_the_fixed_point_on_static_data():
    """Repeated EMA steps on fixed data converge to k-means' fixed point: each centroid is the
    normalised mean of the vectors assigned to it."""
    x = normalize(jax.random.normal(jax.random.key(8), (4, 128, 2, 8)))
    centroids = init_centroids(jax.random.key(9), 2, 4, 8)
    step = jax.jit(lambda c: ema_centroids(c, [x], [assign(x, c)], decay=0.5))
    for _ in range(300):
        centroids = step(centroids)
    cl = assign(x, centroids)
    for h in range(2):
        for c in range(4):  # in numpy: jax's masked gathers compiled afresh for every (h, c)
            chosen = np.asarray(x)[:, :, h][np.asarray(cl[:, :, h]) == c]
            if len(chosen):
                mean = chosen.mean(0)
                np.testing.assert_allclose(centroids[h, c], mean / np.linalg.norm(mean), atol=1e-4)
    np.testing.assert_allclose(step(centroids), centroids, atol=1e-5)


def test_gradients_reach_the_projections_and_not_the_centroids():
    layer = RoutingAttention(32, 4, 8, rngs=nnx.Rngs(0), routing_heads=2, num_clusters=4,
                             window=4, local_window=4)
    x = jax.random.normal(jax.random.key(1), (2, 24, 32))
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    before = rest["centroids"].get_value()

    def loss(params, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        (out, _), sown = run_capturing(model, "__call__", x, pos)
        aux = sum(jnp.sum(v) for v in sown["aux_loss"])
        return jnp.sum(out ** 2) + aux, nnx.state(model, Centroids)

    grads, new_rest = jax.jit(jax.grad(loss, has_aux=True))(params, rest)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert float(jnp.abs(grads[name]["kernel"].get_value()).max()) > 0, name
    assert "centroids" not in grads  # not a parameter: no gradient, no optimiser update
    moved = new_rest["centroids"].get_value()
    assert float(jnp.abs(moved - before).max()) > 0  # the EMA step happened in training
    np.testing.assert_allclose(jnp.linalg.norm(moved, axis=-1), 1.0, atol=1e-5)
    # The commitment loss differentiates into the routed vectors, never the centroids.
    xn = normalize(jax.random.normal(jax.random.key(2), (1, 8, 2, 8)))
    g = jax.grad(lambda c: commitment_loss(c, [xn], [assign(xn, c)]))(before)
    assert float(jnp.abs(g).max()) == 0.0


def test_routing_transformer_is_causal_and_decodes_like_its_forward_pass():
    cfg = tiny_config(*ROUTING).model
    model = build(cfg, nnx.Rngs(0))
    model.eval()
    tokens = jax.random.randint(jax.random.key(0), (2, 28), 0, 256)
    forward = jax.jit(model.__call__)
    full = forward(tokens)
    for t in (5, 17):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % 256)
        np.testing.assert_array_equal(forward(changed)[:, :t + 1], full[:, :t + 1])
    assert_decodes_like_forward(model, tokens, full, ((0, 7), (7, 1), (8, 7), (15, 1), (16, 12)))


def test_routing_tiny_trains_end_to_end_with_the_cli(tmp_path):
    from jaxsparse.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "routing_tiny", "--workdir", str(workdir)]
    for item in ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=64",
                 "model.routing_clusters=4", "model.routing_window=8",
                 "model.routing_local_window=8", "model.max_seq_len=64", "data.seq_len=32",
                 "data.batch_size=8", "train.steps=6", "train.eval_every=6",
                 "train.tensorboard=false", "train.progress=false", "eval.batches=1",
                 "eval.sample_tokens=8"]:
        args += ["--set", item]
    assert main(args) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    assert train_rows and all(np.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in train_rows)
    for r in train_rows:  # the clustering health statistics reach the metrics
        assert 0 <= r["routing_empty"] <= 1 and 0 < r["routing_fill"] <= 1
        assert r["routing_max_cluster"] >= 1 and r["routing_max_cluster"] <= 4
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_bad_routing_configs_and_inputs_are_refused():
    with pytest.raises(ConfigError, match=r"model.routing_clusters=64 exceeds data.seq_len=32"):
        validate(tiny_config(*ROUTING, "model.routing_clusters=64"))
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=2"):
        validate(tiny_config(*[o for o in ROUTING if "kv_heads" not in o]))
    with pytest.raises(ConfigError, match=r"model.routing_heads=5"):
        validate(tiny_config(*ROUTING, "model.routing_heads=5"))
    q, k, v = qkv(jax.random.key(0), length=16)
    with pytest.raises(ValueError, match=r"window=32 exceeds the length 16"):
        balanced_routing_attention(q, k, v, init_centroids(jax.random.key(1), 2, 4, 16), window=32)
    with pytest.raises(ValueError, match=r"centroids must be \[H=2, C, D=16\]"):
        causal_routing_attention(q, k, v, jnp.ones((3, 4, 16)), window=4)


def test_bad_routing_options_and_inputs_are_refused_before_any_work():
    q, k, v = qkv(jax.random.key(0), b=1, length=6, heads=2, dim=4)
    centroids = init_centroids(jax.random.key(1), 2, 3, 4)

    def attend(**kw):
        return causal_routing_attention(q, k, v, centroids, **{"window": 2, **kw})[0]

    for kw, message in [(dict(window=2.5), r"window=2.5: must be an integer >= 1"),
                        (dict(window=0), r"window=0: must be an integer >= 1"),
                        (dict(query_chunk=0), r"query_chunk=0: must be an integer >= 1"),
                        (dict(query_chunk=-1), r"query_chunk=-1: must be an integer >= 1"),
                        (dict(scale=float("nan")), r"scale=nan: must be a finite number > 0"),
                        (dict(scale=0.0), r"scale=0.0: must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            attend(**kw)
    ints = [x.astype(jnp.int32) for x in (q, k, v)]
    for op in (causal_routing_attention, balanced_routing_attention):
        with pytest.raises(ValueError, match=r"q has dtype int32; routing attention needs "
                                             r"floating-point inputs"):
            op(*ints, centroids, window=2)
    with pytest.raises(ValueError, match=r"scale=nan: must be a finite number > 0"):
        balanced_routing_attention(q, k, v, centroids, window=2, scale=float("nan"))
    # a traced scale (a learnt temperature under jit) cannot be checked, and still works
    traced, static = jax.jit(lambda s: (attend(scale=s), attend(scale=0.5)))(0.5)
    np.testing.assert_allclose(traced, static, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"decay=1.0: must be in \[0, 1\)"):  # would divide by 0
        ema_mean(jnp.zeros((2, 4)), jnp.zeros((), jnp.int32), k, decay=1.0)


def test_bad_centroid_learning_inputs_are_refused():
    """A missing cluster list dropped its units from the k-means update (zip), an id out of
    range moved no centroid (and was clamped to the last one in the loss), a mask of another
    length failed inside a multiply."""
    centroids = init_centroids(jax.random.key(0), 2, 4, 8)
    unit = normalize(jax.random.normal(jax.random.key(1), (2, 5, 2, 8)))
    cluster = assign(unit, centroids)
    for call, message in [
            (lambda: ema_centroids(centroids, [unit, unit], [cluster]),
             "2 units and 1 clusters: each unit array needs its cluster ids"),
            (lambda: ema_centroids(centroids, [unit], [cluster.at[0, 0, 0].set(4)]),
             r"clusters\[0\] holds ids in \[0, 4\]: must be in \[0, 4\)"),
            (lambda: commitment_loss(centroids, [unit], [cluster - 1]),
             r"clusters\[0\] holds ids in \[-1, \d\]: must be in \[0, 4\)"),
            (lambda: ema_centroids(centroids, [unit], [cluster], mask=jnp.ones((2, 6))),
             r"mask of shape \(2, 6\): expected \[batch, length\]=\(2, 5\)"),
            (lambda: commitment_loss(centroids, [unit[..., :4]], [cluster]),
             r"units\[0\] of shape \(2, 5, 2, 4\): expected \[batch, length, heads=2, "
             r"head_dim=8\]"),
            (lambda: ema_centroids(centroids, [unit], [cluster[:, :4]]),
             r"clusters\[0\] of shape \(2, 4, 2\) and dtype int32: expected integers of "
             r"shape \(2, 5, 2\)")]:
        with pytest.raises(ValueError, match=message):
            call()


def test_bad_routing_decode_inputs_are_refused():
    q, k, v = qkv(jax.random.key(0), b=1, length=6, heads=2, dim=4)
    centroids = init_centroids(jax.random.key(1), 2, 3, 4)
    clusters = assign(routing_units(k), centroids)                     # [1, 6, 2]
    good = dict(q=q[:, :1], k_cache=k, v_cache=v, k_clusters_cache=clusters, lengths=3,
                centroids=centroids, window=2)
    two = dict(k_cache=jnp.concatenate([k, k]), v_cache=jnp.concatenate([v, v]),
               k_clusters_cache=jnp.concatenate([clusters, clusters]))
    wide = init_centroids(jax.random.key(1), 2, 3, 5)
    for kw, message in [
            (dict(k_clusters_cache=clusters[:, :5]),
             r"k_clusters_cache must be integers \[B=1, S=6, H=2\].*got int32\[1, 5, 2\]"),
            (dict(k_clusters_cache=clusters + 3),
             r"k_clusters_cache holds cluster ids in \[\d, \d\]: each must be in \[-1, "
             r"num_clusters=3\)"),
            (two, r"q and k_cache must have the same batch size"),
            (dict(k_cache=k[:, :, :1], v_cache=v[:, :, :1]), r"k_cache has 1 heads and q has 2"),
            (dict(k_cache=jnp.zeros((1, 6, 2, 5)), v_cache=jnp.zeros((1, 6, 2, 5))),
             r"head dims differ: q has 4, k_cache and v_cache have 5"),
            (dict(centroids=wide), r"centroids must be \[H=2, C, D=4\], got \(2, 3, 5\)"),
            (dict(window=0), r"window=0: must be an integer >= 1"),
            (dict(lengths=0), r"lengths=\[0\]: each must be in \[1, 6\]"),
            (dict(lengths=7), r"lengths=\[7\]: each must be in \[1, 6\]"),
            (dict(lengths=3.0), r"lengths of shape \(\) and dtype float32: expected integers"),
            (dict(scale=float("nan")), r"scale=nan: must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            causal_routing_decode(**{**good, **kw})


def test_no_clusters_and_no_units_are_refused_naming_them():
    """Zero clusters reached an argmax of an empty axis in the balanced attention; an empty
    list of routed units a division by zero (the loss) or an empty concatenate (reseeding)."""
    q = jax.random.normal(jax.random.key(0), (1, 7, 2, 4))
    none = init_centroids(jax.random.key(1), 2, 3, 4)[:, :0]
    for attend in (balanced_routing_attention, causal_routing_attention):
        with pytest.raises(ValueError, match=r"centroids must be \[H=2, C, D=4\], got "
                                             r"\(2, 0, 4\) \(C >= 1 clusters\)"):
            attend(q, q, q, none, window=2)
    centroids = init_centroids(jax.random.key(1), 2, 3, 4)
    for update in (lambda: commitment_loss(centroids, [], []),
                   lambda: ema_centroids(centroids, [], [], 0.9, reseed=True)):
        with pytest.raises(ValueError, match=r"units=\[\]: at least one array of routed vectors"):
            update()


def test_bad_routing_layer_options_are_refused_when_built_and_decoding_past_the_cache():
    def layer(**kw):  # the sizes of the layers below: nothing new to compile
        options = dict(routing_heads=1, num_clusters=4, window=3, local_window=4)
        return RoutingAttention(32, 2, 8, rngs=nnx.Rngs(0), **{**options, **kw})

    for kw, message in [(dict(window=2.5), r"window=2.5: must be an integer >= 1"),
                        (dict(local_window=0), r"local_window=0: must be an integer >= 1"),
                        (dict(center=True, center_decay=1.0),
                         r"center_decay=1.0: must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            layer(**kw)
    short_cache = layer(local_window=8)  # local heads keep every position of a shorter cache
    short_cache.eval()
    x = jax.random.normal(jax.random.key(2), (1, 2, 32))
    with pytest.raises(ValueError, match=r"index=3 with 2 new tokens needs index \+ 2 <= 4"):
        short_cache(x, jnp.arange(3, 5)[None], cache=short_cache.init_cache(1, 4), cache_index=3)


def test_routing_layer_options_are_checked_when_built_and_decode_inputs_when_decoding():
    """Options that failed at the first call (rope_theta=0), deep inside JAX (routing_heads=1.5)
    or never (commitment=nan); decode inputs that failed inside dynamic_update_slice or with
    "NoneType + int"."""
    def layer(**kw):  # the sizes of the layers above: nothing new to compile
        options = dict(routing_heads=1, num_clusters=4, window=3, local_window=4)
        return RoutingAttention(32, 2, 8, rngs=nnx.Rngs(0), **{**options, **kw})

    for kw, message in [(dict(routing_heads=1.5), r"routing_heads=1.5: must be an integer in "
                                                  r"\[1, n_heads=2\]"),
                        (dict(rope_theta=0.0), "rope_theta=0.0: must be a finite number > 0"),
                        (dict(commitment=float("nan")), "commitment=nan: must be a finite "
                                                        "number >= 0")]:
        with pytest.raises(ValueError, match=message):
            layer(**kw)
    attention = layer()
    attention.eval()
    with pytest.raises(ValueError, match="dtype='int32': a decode cache must have a floating"):
        attention.init_cache(1, 4, jnp.int32)
    x = jax.random.normal(jax.random.key(2), (2, 1, 32))
    positions = jnp.zeros((2, 1), jnp.int32)
    cache = attention.init_cache(2, 4)
    attention(x, positions, cache=cache, cache_index=0)  # the valid baseline
    for index, message in [(1.0, r"cache_index: index of shape \(\) and dtype float32"),
                           (jnp.array([0, 0]), r"cache_index: index of shape \(2,\)"),
                           (None, "cache_index=None: decoding with a cache needs")]:
        with pytest.raises(ValueError, match=message):
            attention(x, positions, cache=cache, cache_index=index)
    with pytest.raises(ValueError, match=r"cache\['k'\] of shape \(1, 1, 4, 8\): made for "
                                         r"another batch size than the input's 2"):
        attention(x, positions, cache=attention.init_cache(1, 4), cache_index=0)


def test_restoring_a_checkpoint_without_centroids_names_them(tmp_path):
    from jaxsparse.train.checkpoint import CheckpointMismatch, Checkpointer
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.parallel import make_mesh

    cfg = apply_overrides(tiny_config(*ROUTING), ["train.steps=1"])
    setup = TrainSetup(cfg, make_mesh(cfg.mesh))
    state = setup.init()
    broken = dict(state, rest={})  # a checkpoint written without the non-parameter state
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
    ckpt.save(1, broken, cfg, force=True)
    with pytest.raises(CheckpointMismatch, match=r"rest/blocks/1/attn/centroids"):
        ckpt.restore(setup.abstract_state, 1)
    ckpt.close()


def test_query_chunks_change_nothing_forward_or_backward():
    q, k, v = qkv(jax.random.key(11), length=300)
    centroids = init_centroids(jax.random.key(12), 2, 6, 16)

    def loss(q, k, v, chunk):
        out = causal_routing_attention(q, k, v, centroids, window=20, query_chunk=chunk)[0]
        return jnp.sum(out * jnp.cos(out))

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    whole, chunked = value_and_grad(q, k, v, 512), value_and_grad(q, k, v, 64)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_shared_qk_local_heads_use_unit_keys_and_skip_themselves_unless_alone():
    """With shared QK the local heads took the raw queries as keys, their own included: the
    self logit ‖q‖²/√D ≈ √D drew ~98% of a 64-dim head's weight at init. They now follow the
    routing heads' rule: unit queries times √D as keys, and a token's own key only when it
    has no other (the first token of the sequence or of a document). Forward (packed
    documents) and decode against a brute-force window."""
    from jaxsparse.ops.rotary import apply_rotary

    layer = RoutingAttention(32, 4, 8, rngs=nnx.Rngs(5), routing_heads=2, num_clusters=4,
                             window=3, local_window=4, shared_qk=True)
    layer.eval()
    length = 13
    x = jax.random.normal(jax.random.key(6), (2, length, 32))
    pos = jnp.broadcast_to(jnp.arange(length), (2, length))
    seg = jnp.array([[0] * 5 + [1] * 8, [0] * length])
    q, _, v = layer._project(x)
    q_loc = apply_rotary(q[:, :, :2], pos, layer.rope_theta)
    keys = shared_keys(q_loc)
    t, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]

    def local_reference(segments):
        same = segments[:, :, None] == segments[:, None, :]
        window = ((j <= t) & (j > t - 4))[None] & same  # [B, t, j]
        others = window & (j != t)[None]
        visible = jnp.where(jnp.any(others, -1, keepdims=True), others, window)
        logits = jnp.einsum("bthd,bshd->bhts", q_loc, keys) / jnp.sqrt(8.0)
        weights = jax.nn.softmax(jnp.where(visible[:, None], logits, -jnp.inf), -1)
        return jnp.einsum("bhts,bshd->bthd", weights, v[:, :, :2])

    def routed_reference(segments):
        return routing_jit(q[:, :, 2:], q[:, :, 2:], v[:, :, 2:], layer.centroids[...],
                           window=3, shared_qk=True, segment_ids=segments)[0]

    def layer_reference(segments):
        return layer.o_proj(jnp.concatenate([local_reference(segments),
                                             routed_reference(segments)], axis=2))

    out, _ = layer(x, pos, segment_ids=seg)
    np.testing.assert_allclose(out, layer_reference(seg), atol=2e-5, rtol=2e-5)
    whole = jnp.zeros((2, length), jnp.int32)
    cache, pieces = layer.init_cache(2, length), []
    for lo, hi in ((0, 1), (1, 6), (6, length)):  # the ring of 4 slots wraps
        piece, cache = layer(x[:, lo:hi], pos[:, lo:hi], cache=cache, cache_index=lo)
        pieces.append(piece)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), layer_reference(whole),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_dense_warm_up_attends_to_every_earlier_key_then_routes(shared_qk):
    """``dense_steps=2``: the first two training calls use dense causal attention in the
    routing heads (centroids still move), the third routes; evaluation always routes."""
    layer = RoutingAttention(32, 2, 8, rngs=nnx.Rngs(3), routing_heads=2, num_clusters=4,
                             window=3, local_window=4, shared_qk=shared_qk, dense_steps=2)
    x = jax.random.normal(jax.random.key(4), (2, 21, 32))
    pos = jnp.broadcast_to(jnp.arange(21), (2, 21))
    q, k, v = layer._project(x)
    keys = shared_keys(q) if shared_qk else k
    logits = jnp.einsum("bthd,bshd->bhts", q, keys) / jnp.sqrt(8.0)
    visible = jnp.tril(jnp.ones((21, 21), bool), -1 if shared_qk else 0)
    visible = visible.at[0, 0].set(True)  # shared: itself only when it has nothing else
    weights = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), -1), 0.0)
    dense = layer.o_proj(jnp.nan_to_num(jnp.einsum("bhts,bshd->bthd", weights, v)))

    def routed():
        out, _ = routing_jit(q, k, v, layer.centroids[...], window=3, shared_qk=shared_qk)
        return layer.o_proj(out)

    forward = nnx.jit(lambda layer, x, pos: layer(x, pos))  # op by op a call took ~1 s
    expected = [dense, dense, None]
    for call, want in enumerate(expected):
        before = layer.centroids[...]
        want = routed() if want is None else want
        out, _ = forward(layer, x, pos)
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5, err_msg=f"call {call}")
        assert float(jnp.abs(layer.centroids[...] - before).max()) > 0  # EMA kept learning
        assert int(layer.step[...]) == call + 1
    assert float(jnp.abs(dense - routed()).max()) > 1e-3  # the two paths really differ
    fresh = RoutingAttention(32, 2, 8, rngs=nnx.Rngs(3), routing_heads=2, num_clusters=4,
                             window=3, local_window=4, shared_qk=shared_qk, dense_steps=2)
    fresh.eval()
    out, _ = forward(fresh, x, pos)
    want, _ = routing_jit(q, k, v, fresh.centroids[...], window=3, shared_qk=shared_qk)
    np.testing.assert_allclose(out, fresh.o_proj(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"dense_steps=-1: must be an integer >= 0"):
        RoutingAttention(32, 2, 8, rngs=nnx.Rngs(3), routing_heads=2, num_clusters=4, window=3,
                         local_window=4, dense_steps=-1)
    with pytest.raises(ConfigError, match=r"model.routing_dense_steps=-5: must be >= 0"):
        validate(tiny_config(*ROUTING, "model.routing_dense_steps=-5"))


def test_routing_statistics_count_empty_windows_fill_and_the_largest_cluster():
    read = jnp.array([[[0], [3], [4], [1]]])                   # [B=1, L=4, H=1]
    clusters = jnp.array([[[2], [2], [2], [0]]])               # 3 of 4 keys in cluster 2
    stats = routing_statistics({"keys_read": read, "k_clusters": clusters}, 4, window=4)
    np.testing.assert_allclose(stats["routing_empty"], 0.25)
    np.testing.assert_allclose(stats["routing_fill"], (0 + 3 + 4 + 1) / 4 / 4)
    np.testing.assert_allclose(stats["routing_max_cluster"], 0.75 * 4)
    q, k, v = qkv(jax.random.key(5), length=40)
    _, routing = routing_jit(q, k, v, init_centroids(jax.random.key(6), 2, 5, 16), window=6)
    brute = np.zeros(routing["keys_read"].shape, int)
    cq, ck = np.asarray(routing["q_clusters"]), np.asarray(routing["k_clusters"])
    for b, t, h in np.ndindex(*brute.shape):
        brute[b, t, h] = min(6, int(np.sum(ck[b, :t + 1, h] == cq[b, t, h])))
    np.testing.assert_array_equal(routing["keys_read"], brute)


def test_running_mean_is_the_batch_mean_at_first_and_a_decayed_average_later():
    batches = [jax.random.normal(jax.random.key(i), (3, 10, 2, 4)) + i for i in range(4)]
    mean, count = jnp.zeros((2, 4)), jnp.zeros((), jnp.int32)
    means = []
    for x in batches:
        mean, count = ema_mean(mean, count, x, decay=0.9)
        means.append(mean)
    np.testing.assert_allclose(means[0], batches[0].mean(axis=(0, 1)), atol=1e-6)
    weights = 0.9 ** np.arange(3, -1, -1)  # oldest batch weighs least
    expected = sum(w * x.mean(axis=(0, 1)) for w, x in zip(weights, batches)) / weights.sum()
    np.testing.assert_allclose(means[-1], expected, atol=1e-5)
    assert int(count) == 4
    # Padding (mask 0) does not count.
    x = batches[0].at[:, 5:].set(100.0)
    mask = jnp.ones((3, 10)).at[:, 5:].set(0.0)
    np.testing.assert_allclose(ema_mean(jnp.zeros((2, 4)), jnp.zeros((), jnp.int32), x, 0.9,
                                        mask)[0], batches[0][:, :5].mean(axis=(0, 1)), atol=1e-6)


def _cone(key, steps, b=4, length=64, d=32):
    """Layer inputs whose routed vectors share a large common component (a narrow cone)."""
    common = 6.0 * jax.random.normal(jax.random.key(100), (1, 1, d))
    return [common + jax.random.normal(k, (b, length, d)) for k in jax.random.split(key, steps)]


@pytest.mark.parametrize("center", [False, True])
def test_centring_keeps_k_means_from_collapsing_onto_a_common_direction(center):
    """Uncentred spherical k-means on a narrow cone puts (almost) every token in one cluster;
    routing by x - running mean spreads them over the clusters. Both arms run, so the test
    fails if either the collapse or its cure is not real."""
    layer = RoutingAttention(32, 2, 16, rngs=nnx.Rngs(0), routing_heads=2, num_clusters=8,
                             window=8, local_window=4, shared_qk=True, decay=0.9,
                             center=center)
    pos = jnp.broadcast_to(jnp.arange(64), (4, 64))
    step = nnx.jit(lambda m, x: run_capturing(m, "__call__", x, pos)[1])
    for x in _cone(jax.random.key(0), 30):
        sown = step(layer, x)
    largest = float(sown["routing_max_cluster"][0])  # 1 = balanced, 8 = one cluster
    if center:
        assert largest < 2.5, largest
        assert int(layer.route_mean_count[...]) == 30
    else:
        assert largest > 4.0, largest


def test_centred_routing_transformer_is_causal_and_decodes_like_its_forward_pass(tmp_path):
    cfg = apply_overrides(tiny_config(*ROUTING, "model.routing_center=true"),
                          ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3",
                           "eval.batches=1", "eval.sample_tokens=0", "train.tensorboard=false"])
    result = train(cfg, tmp_path / "run", sample=False)
    from jaxsparse.train.state import TrainSetup
    from jaxsparse.parallel import make_mesh
    model = TrainSetup(cfg, make_mesh(cfg.mesh)).model(result.state["params"],
                                                       result.state["rest"])
    attn = model.blocks[1].attn
    assert attn.center and int(attn.route_mean_count[...]) == 3
    assert float(jnp.abs(attn.route_mean[...]).max()) > 0  # trained centres are in use
    model.eval()
    tokens = jax.random.randint(jax.random.key(0), (2, 28), 0, 256)
    assert_causal_and_decodes_like_forward(model, tokens, 12, ((0, 9), (9, 1), (10, 18)))
    with pytest.raises(ValueError, match=r"q_center must be \[H=2, D=16\]"):
        q, k, v = qkv(jax.random.key(0), length=8)
        causal_routing_attention(q, k, v, init_centroids(jax.random.key(1), 2, 4, 16), window=4,
                                 q_center=jnp.zeros((3, 16)))


@pytest.mark.parametrize("key_centroids", [False, True])
def test_key_centroids_give_every_query_a_cluster_that_holds_keys(key_centroids):
    """Queries around one direction, keys spread over the opposite hemisphere (separate
    projections that disagree, as early in training): k-means on queries and keys gives the
    queries a centroid of their own that no key is near, so every query window is empty;
    centroids that follow the keys only (``key_centroids``), with each query sent to the one it
    scores highest, leave a window empty only until the first key of its cluster has arrived
    (about one cluster's spacing, 64 / 8 positions, of 64). Both arms run, so each claim can
    fail."""
    a = jnp.zeros((1, 1, 1, 16)).at[..., 0].set(1.0)
    q = 3.0 * a + 0.3 * jax.random.normal(jax.random.key(0), (4, 64, 2, 16))
    k = jax.random.normal(jax.random.key(1), (4, 64, 2, 16))
    k = k.at[..., 0].set(-jnp.abs(k[..., 0]) - 0.5)                 # the other hemisphere
    v = jax.random.normal(jax.random.key(2), (4, 64, 2, 16))
    centroids = init_centroids(jax.random.key(3), 2, 8, 16)

    @jax.jit  # op by op the 20 steps took 3 s
    def step(centroids):
        routing = causal_routing_attention(q, k, v, centroids, window=8)[1]
        units = [routing["k_unit"]] if key_centroids else [routing["q_unit"], routing["k_unit"]]
        clusters = ([routing["k_clusters"]] if key_centroids
                    else [routing["q_clusters"], routing["k_clusters"]])
        return ema_centroids(centroids, units, clusters, decay=0.5), routing

    for _ in range(20):
        centroids, routing = step(centroids)
    empty = float(jnp.mean(routing["keys_read"] == 0))
    if key_centroids:
        assert empty < 0.25, empty
    else:
        assert empty > 0.9, empty


def test_key_centroids_move_with_the_keys_only():
    layer = RoutingAttention(32, 2, 16, rngs=nnx.Rngs(1), routing_heads=2, num_clusters=4,
                             window=4, local_window=4, center=True, key_centroids=True)
    x = jax.random.normal(jax.random.key(5), (2, 24, 32))
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    before = layer.centroids[...]
    k = layer.k_proj(x)                                              # both heads route
    nnx.jit(lambda layer: run_capturing(layer, "__call__", x, pos))(layer)
    units = normalize(k)              # the first call centres by the initial (zero) mean
    ema = jax.jit(lambda c, u: ema_centroids(c, [u], [assign(u, c)], decay=0.999))
    expected = ema(before, units)
    np.testing.assert_allclose(layer.centroids[...], expected, atol=1e-5)
    np.testing.assert_allclose(layer.route_mean[...], k.mean(axis=(0, 1)), atol=1e-5)


def test_reach_probe_finds_the_value_each_mqar_answer_needs():
    """experiments/routing/probe.py locates, for every answer, the opening value it must copy:
    the token there is the answer's target (and nothing is located where no answer is due)."""
    import importlib.util

    from jaxsparse.data.synthetic import mqar

    spec = importlib.util.spec_from_file_location("probe", ROOT / "experiments/routing/probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    batch = mqar(np.random.default_rng(0), 6, 200, 32, 5, filler="random")
    need = probe.value_positions(batch["inputs"], batch["mask"], 5)
    rows = batch["mask"] > 0
    assert rows.sum() == 6 * 5 and (need[~rows] == -1).all()
    b, t = np.nonzero(rows)
    np.testing.assert_array_equal(batch["inputs"][b, need[b, t]], batch["targets"][b, t])
    assert (need[rows] % 2 == 1).all() and (need[rows] < 10).all()


def test_routing_study_names_split_windows_in_label_run_and_overrides():
    """experiments/routing/study.py: ``--window`` sets keys per probe; a run with a non-default
    window gets its own label and directory, so it never overwrites the paper-window row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments/routing/study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    (label, (run, overrides)), = [(k, v) for k, v in study.variants(
        1024, 32, probes=4, window=8).items() if k.startswith("routing")]
    assert "model.routing_window=8" in overrides and "model.routing_probes=4" in overrides
    assert "window 8 per probe" in label and run.endswith("_probes4_window8")
    (label, (run, overrides)), = [(k, v) for k, v in study.variants(
        1024, 32, probes=4).items() if k.startswith("routing")]
    assert "model.routing_window=32" in overrides and "window" not in label + run


def test_a_second_probe_frees_a_query_stuck_among_identical_keys():
    """A query whose best cluster holds only copies of one key (a filler token's) reads a flat
    softmax over equal keys: its gradient is exactly zero, so training cannot move it out. With
    two probes it also reads its second cluster, where the key it needs sits, and gets a
    gradient towards that key. Both arms run, so each claim can fail."""
    dim, length = 8, 40
    filler, needed = jnp.eye(dim)[0], jnp.eye(dim)[1]
    centroids = jnp.stack([filler, needed, jnp.eye(dim)[2]])[None]           # [1, 3, D]
    k = jnp.broadcast_to(filler, (1, length, 1, dim)).at[0, 3, 0].set(needed)
    v = jax.random.normal(jax.random.key(0), (1, length, 1, dim))
    q = jnp.zeros((1, length, 1, dim)).at[0, -1, 0].set(0.9 * filler + 0.3 * needed)

    def copied(q, probes):  # how much of the needed value the last query returns
        out = causal_routing_attention(q, k, v, centroids, window=8, probes=probes)[0]
        return out[0, -1, 0] @ v[0, 3, 0]

    stuck = jax.jit(jax.grad(copied), static_argnums=1)(q, 1)
    freed = jax.jit(jax.grad(copied), static_argnums=1)(q, 2)
    assert float(jnp.abs(stuck).max()) < 1e-6                        # zero up to rounding
    assert float(freed[0, -1, 0] @ needed) > 0.05                   # towards the needed key


def test_multi_probe_routing_transformer_is_causal_and_decodes_like_its_forward_pass():
    cfg = tiny_config(*ROUTING, "model.routing_probes=3").model
    model = build(cfg, nnx.Rngs(2))
    assert model.blocks[1].attn.probes == 3
    model.eval()
    tokens = jax.random.randint(jax.random.key(1), (2, 30), 0, 256)
    full = assert_causal_and_decodes_like_forward(model, tokens, 14,
                                                  ((0, 9), (9, 1), (10, 1), (11, 19)))
    one_probe = build(tiny_config(*ROUTING).model, nnx.Rngs(2))
    one_probe.eval()
    one_probe_logits = jax.jit(one_probe.__call__)(tokens)
    assert float(jnp.abs(one_probe_logits - full).max()) > 1e-3    # the probes are read


def test_bad_probe_counts_are_refused():
    with pytest.raises(ConfigError, match=r"model.routing_probes=5: must be in \[1, "
                                          r"model.routing_clusters=4\]"):
        validate(tiny_config(*ROUTING, "model.routing_probes=5"))
    with pytest.raises(ConfigError, match=r"model.routing_probes=0"):
        validate(tiny_config(*ROUTING, "model.routing_probes=0"))
    q, k, v = qkv(jax.random.key(0), length=16)
    with pytest.raises(ValueError, match=r"probes=5: must be an integer in \[1, num_clusters=4\]"):
        causal_routing_attention(q, k, v, init_centroids(jax.random.key(1), 2, 4, 16), window=4,
                                 probes=5)
    with pytest.raises(ValueError, match=r"probes=0"):
        RoutingAttention(32, 2, 16, rngs=nnx.Rngs(0), routing_heads=2, num_clusters=4, window=4,
                         local_window=4, probes=0)


@pytest.mark.parametrize("reseed", [False, True])
def test_dead_centroids_are_reseeded_onto_the_worst_served_vectors(reseed):
    """Three separated groups of vectors, one centroid near the first group and three facing
    away from all of them: without re-seeding the three never win a vector and never move;
    with it, after a few steps every group has a centroid of its own (the worst-served vectors
    are those of the groups nobody serves). Both arms run, so each claim can fail."""
    eye = jnp.eye(8)
    groups = jnp.stack([eye[0], eye[1], eye[2]])                     # [3, D]
    noise = 0.05 * jax.random.normal(jax.random.key(0), (2, 30, 1, 8))
    x = normalize(jnp.repeat(groups, 10, axis=0)[None, :, None, :] + noise)   # [2, 30, 1, D]
    which = jnp.repeat(jnp.arange(3), 10)
    # The first centroid is the nearest for every vector (positive on all three groups).
    centroids = normalize(jnp.stack([eye[0] + 0.3 * eye[1] + 0.3 * eye[2],
                                     -eye[0] - eye[1] - eye[2], -eye[1] - eye[4],
                                     -eye[2] - eye[5]]))[None]              # [1, 4, D]
    for _ in range(4):
        centroids = ema_centroids(centroids, [x], [assign(x, centroids)], decay=0.9,
                                  reseed=reseed)
    clusters = np.asarray(assign(x, centroids))[..., 0]              # [2, 30]
    served = {g: set(clusters[:, np.asarray(which) == g].ravel().tolist()) for g in range(3)}
    distinct = len(set().union(*served.values()))
    if reseed:
        assert distinct >= 3 and not (served[0] & served[1] or served[1] & served[2]
                                      or served[0] & served[2]), served
    else:
        assert distinct == 1, served                                 # everything in one cluster
    np.testing.assert_allclose(jnp.linalg.norm(centroids, axis=-1), 1.0, atol=1e-5)


def test_ema_centroids_refuses_a_decay_outside_zero_to_one():
    # decay=nan returned NaN centroids, silently poisoning every later assignment
    centroids = init_centroids(jax.random.key(0), 3, 4, 5)
    units = normalize(jax.random.normal(jax.random.key(1), (2, 7, 3, 5)))
    for decay in (float("nan"), -0.1, 1.5, float("inf")):
        with pytest.raises(ValueError, match=rf"decay={decay!r}: must be in \[0, 1\]"):
            ema_centroids(centroids, [units], [assign(units, centroids)], decay=decay)
    for decay in (0.0, 0.9, 1.0):
        out = ema_centroids(centroids, [units], [assign(units, centroids)], decay=decay)
        assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, centroids, atol=1e-6)  # decay 1: nothing moves
