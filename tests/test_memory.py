"""Product-key memory: the product top-k equals exhaustive scoring over all slots, the layer's
read equals a dense softmax read, gradients are sparse in the values, large tables never get
scored in full, and the values train with their own optimiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.config import OptimizerConfig
from jaxsparse.nn import ProductKeyMemory
from jaxsparse.ops.memory import exhaustive_topk, memory_read, product_key_topk
from jaxsparse.train.optim import make_optimizer
from jaxsparse.train.state import optimizer_groups


@pytest.mark.parametrize("n_keys,knn,heads", [(16, 4, 1), (32, 8, 2), (7, 7, 3), (64, 1, 2)])
def test_product_top_k_equals_exhaustive_scoring(n_keys, knn, heads):
    k1, k2, k3 = jax.random.split(jax.random.key(n_keys + knn), 3)
    sub1 = jax.random.normal(k1, (heads, n_keys, 8))
    sub2 = jax.random.normal(k2, (heads, n_keys, 8))
    query = jax.random.normal(k3, (5, 3, heads, 16))
    # compiled: op by op the two lookups took up to 1.5 s
    scores, slots = jax.jit(product_key_topk, static_argnums=3)(query, sub1, sub2, knn)
    want_scores, want_slots = jax.jit(exhaustive_topk, static_argnums=3)(query, sub1, sub2, knn)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(slots, want_slots)  # continuous random scores: no ties


def test_layer_read_equals_a_dense_read_over_the_chosen_slots():
    layer = ProductKeyMemory(24, rngs=nnx.Rngs(0), n_keys=16, heads=2, k_dim=8, knn=4)
    x = jax.random.normal(jax.random.key(1), (2, 5, 24))
    y = layer(x)
    q = layer.query(x)
    half = 4
    s1 = jnp.einsum("blhd,hnd->blhn", q[..., :half], layer.subkeys1[...])
    s2 = jnp.einsum("blhd,hnd->blhn", q[..., half:], layer.subkeys2[...])
    every = (s1[..., :, None] + s2[..., None, :]).reshape(2, 5, 2, 256)
    top = jax.lax.top_k(every, 4)[1]
    keep = jnp.sum(jax.nn.one_hot(top, 256), axis=-2) > 0                # [B, L, H, N]
    weights = jax.nn.softmax(jnp.where(keep, every, -jnp.inf), axis=-1)
    want = jnp.einsum("blhn,nv->blv", weights, layer.values[...])
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_value_gradients_touch_only_the_slots_read():
    layer = ProductKeyMemory(16, rngs=nnx.Rngs(2), n_keys=32, heads=2, k_dim=8, knn=4)
    x = jax.random.normal(jax.random.key(3), (3, 16))
    _, slots = nnx.jit(lambda m, x: m.lookup(x))(layer, x)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)  # op by op: 2.5 s
    touched = np.flatnonzero(np.abs(np.asarray(grads["values"][...])).sum(-1))
    assert set(touched) <= set(np.asarray(slots).ravel().tolist())
    assert len(touched) > 0 and len(touched) <= 3 * 2 * 4
    for name in ("query", "subkeys1", "subkeys2"):
        leaves = jax.tree.leaves(grads[name])
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves), name


def test_a_quarter_million_slots_are_never_scored_in_full():
    """The paper's size (512² slots, knn 32, 4 heads): the product lookup never materialises a
    score per slot — its scratch memory is a small fraction of exhaustive scoring's — and it
    does about half the arithmetic (the sub-key scores, without the n² sums)."""
    heads, n, half, knn = 4, 512, 128, 32
    sub = jax.ShapeDtypeStruct((heads, n, half), jnp.float32)
    query = jax.ShapeDtypeStruct((64, heads, 2 * half), jnp.float32)

    def compiled(fn):
        return jax.jit(lambda q, a, b: fn(q, a, b, knn)).lower(query, sub, sub).compile()

    product, exhaustive = compiled(product_key_topk), compiled(exhaustive_topk)
    every_score = 64 * heads * n * n * 4  # bytes of one float32 score per slot
    assert product.memory_analysis().temp_size_in_bytes < every_score / 50
    assert exhaustive.memory_analysis().temp_size_in_bytes >= every_score

    def flops(c):
        cost = c.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(product) < 0.6 * flops(exhaustive)


def test_memory_values_train_with_their_own_learning_rate():
    layer = ProductKeyMemory(16, rngs=nnx.Rngs(4), n_keys=8, heads=1, k_dim=8, knn=2)
    params = nnx.state(layer, nnx.Param)
    groups = optimizer_groups(params)
    assert groups["values"] == "memory_values" and groups["subkeys1"] == "default"
    cfg = OptimizerConfig(lr=1e-5, warmup_steps=0, memory_values_lr=1e-2, weight_decay=0.0)
    tx = make_optimizer(cfg, 10, groups=groups)
    pure = nnx.to_pure_dict(params)
    grads = jax.tree.map(jnp.ones_like, pure)
    updates, _ = tx.update(grads, tx.init(pure), pure)
    # Adam's first step moves every coordinate by about its learning rate.
    assert float(jnp.abs(updates["values"]).max()) == pytest.approx(1e-2, rel=1e-3)
    assert float(jnp.abs(updates["subkeys1"]).max()) < 1e-4


def test_bad_memory_settings_are_refused():
    with pytest.raises(ValueError, match="k_dim=7"):
        ProductKeyMemory(16, rngs=nnx.Rngs(0), n_keys=8, k_dim=7)
    with pytest.raises(ValueError, match=r"knn=9: must be in \[1, n_keys=8\]"):
        ProductKeyMemory(16, rngs=nnx.Rngs(0), n_keys=8, knn=9)
    with pytest.raises(ValueError, match=r"query \(2, 3, 8\): last dims must be"):
        product_key_topk(jnp.ones((2, 3, 8)), jnp.ones((2, 4, 2)), jnp.ones((2, 4, 2)), 2)
    with pytest.raises(ValueError, match=r"scores \(1, 2\), slots \(1, 3\) int32"):
        memory_read(jnp.zeros((1, 2)), jnp.array([[0, 1, 1]]), jnp.eye(2))
    with pytest.raises(ValueError, match=r"slots \(1, 2\) float32"):
        memory_read(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.eye(2))
    np.testing.assert_allclose(memory_read(jnp.zeros((1, 2)), jnp.array([[0, 1]]),
                                           jnp.eye(2)), [0.5, 0.5])


def test_sub_key_tables_of_different_shapes_and_non_integer_knn_are_refused():
    # a second table of 6 keys beside one of 4 gave slot indices past the 16-row table
    query, keys = jnp.ones((5, 2, 6)), jnp.ones((2, 4, 3))
    for other in (jnp.ones((2, 6, 3)), jnp.ones((2, 4, 4)), jnp.ones((3, 4, 3))):
        with pytest.raises(ValueError, match=rf"subkeys2 \({other.shape[0]}, {other.shape[1]}, "
                                             r"\d\) must match subkeys1 \(2, 4, 3\)"):
            product_key_topk(query, keys, other, 2)
    with pytest.raises(ValueError, match=r"subkeys1 \(4, 3\): must be \[heads, n_keys"):
        product_key_topk(query, keys[0], keys[0], 2)
    with pytest.raises(ValueError, match=r"knn=2.0: must be an integer in \[1, n_keys=4\]"):
        product_key_topk(query, keys, keys, 2.0)
    for option in ({"knn": 2.0}, {"heads": 0}, {"n_keys": True}):
        name, value = next(iter(option.items()))
        with pytest.raises(ValueError, match=rf"{name}={value}: must be an integer >= 1"):
            ProductKeyMemory(8, rngs=nnx.Rngs(0), **({"n_keys": 4, "k_dim": 4} | option))


@pytest.mark.parametrize("implementation", [None, "scan", "native"])
@pytest.mark.parametrize("lead,heads,knn,slots,dim", [((2, 7), 2, 4, 50, 6), ((3,), 1, 1, 5, 3),
                                                      ((1, 1, 5), 3, 8, 64, 1)])
def test_memory_read_equals_gathering_every_row(lead, heads, knn, slots, dim, implementation):
    """The row-at-a-time read (no [..., heads, knn, V] block) equals gather-then-sum, values
    and gradients, including slots chosen by several heads of one token — each implementation
    (the scan is the GPU/TPU default, only the native kernel the CPU one)."""
    from jaxsparse.ops.memory import memory_read_reference

    keys = jax.random.split(jax.random.key(len(lead) + knn), 4)
    scores = jax.random.normal(keys[0], lead + (heads, knn))
    chosen = jax.random.randint(keys[1], lead + (heads, knn), 0, slots)
    values = jax.random.normal(keys[2], (slots, dim))
    probe = jax.random.normal(keys[3], lead + (dim,))
    loss = lambda read: lambda s, v: jnp.sum(jnp.sin(read(s, chosen, v)) * probe)  # noqa: E731
    read = functools.partial(memory_read, implementation=implementation)
    np.testing.assert_allclose(read(scores, chosen, values),
                               memory_read_reference(scores, chosen, values), rtol=1e-5, atol=1e-6)
    ours = jax.grad(loss(read), argnums=(0, 1))(scores, values)
    ref = jax.grad(loss(memory_read_reference), argnums=(0, 1))(scores, values)
    assert float(jnp.max(jnp.abs(ref[1]))) > 1e-3  # (one slot per head: a constant weight)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_scan_read_is_within_bfloat16_error_of_the_float32_read():
    """The scan read of bfloat16 scores and values (the CPU default for bfloat16) against the
    float32 reference on the same rounded inputs: values and gradients to a few bfloat16
    spacings (2^-8), relative to the largest entry."""
    from jaxsparse.ops.memory import memory_read_reference

    keys = jax.random.split(jax.random.key(11), 4)
    scores = jax.random.normal(keys[0], (3, 5, 2, 4)).astype(jnp.bfloat16)
    chosen = jax.random.randint(keys[1], (3, 5, 2, 4), 0, 40)
    values = jax.random.normal(keys[2], (40, 16)).astype(jnp.bfloat16)
    probe = jax.random.normal(keys[3], (3, 5, 16))
    loss = lambda read: lambda s, v: jnp.sum(  # noqa: E731
        jnp.sin(read(s, chosen, v).astype(jnp.float32)) * probe)
    scan = functools.partial(memory_read, implementation="scan")
    wide = [x.astype(jnp.float32) for x in (scores, values)]
    # compiled: op by op these reads and gradients took 2.5 s
    out = jax.jit(scan)(scores, chosen, values)
    assert out.dtype == jnp.bfloat16
    pairs = [(out, jax.jit(memory_read_reference)(wide[0], chosen, wide[1]))]
    pairs += list(zip(jax.jit(jax.grad(loss(scan), (0, 1)))(scores, values),
                      jax.jit(jax.grad(loss(memory_read_reference), (0, 1)))(*wide)))
    for got, want in pairs:
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 8 * 2.0**-8 * np.max(np.abs(want))


def test_a_bfloat16_read_of_many_picks_sums_them_in_float32():
    """4 heads x 32 picks (the defaults): a bfloat16 running sum rounded at every add was 8x
    one rounding of the float32 sum (1.4e-2 against 1.7e-3, relative norm)."""
    from jaxsparse.ops.memory import memory_read_reference

    keys = jax.random.split(jax.random.key(12), 3)
    scores = jax.random.normal(keys[0], (64, 4, 32))
    chosen = jax.random.randint(keys[1], (64, 4, 32), 0, 512)
    values = jax.random.normal(keys[2], (512, 64)).astype(jnp.bfloat16)
    got = jax.jit(functools.partial(memory_read, implementation="scan"))(scores, chosen, values)
    want = memory_read_reference(scores, chosen, values.astype(jnp.float32))
    error = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert got.dtype == jnp.bfloat16 and error < 3e-3, error


def test_the_bfloat16_memory_picks_the_float32_memorys_slots():
    """The query projection computes in float32 whatever the layer's dtype: a bfloat16 query
    flipped 3% of the top-k picks at init."""
    from jaxsparse.nn import ProductKeyMemory

    wide = ProductKeyMemory(64, n_keys=64, heads=2, k_dim=64, knn=16, rngs=nnx.Rngs(0))
    narrow = ProductKeyMemory(64, n_keys=64, heads=2, k_dim=64, knn=16, rngs=nnx.Rngs(0),
                              dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(13), (4, 32, 64))
    np.testing.assert_array_equal(narrow.lookup(x)[1], wide.lookup(x)[1])


@pytest.mark.parametrize("implementation,dtype", [(None, jnp.float32), (None, jnp.bfloat16),
                                                   ("scan", jnp.float32), ("scan", jnp.bfloat16),
                                                   ("native", jnp.float32)])
def test_memory_read_of_an_empty_batch_is_empty(implementation, dtype):
    # the scan path reshaped [0, heads, knn] with -1 and crashed (ZeroDivisionError)
    out = memory_read(jnp.ones((0, 1, 2), dtype), jnp.zeros((0, 1, 2), jnp.int32),
                      jnp.ones((9, 4), dtype), implementation=implementation)
    assert out.shape == (0, 4) and out.dtype == dtype


@pytest.mark.parametrize("implementation", [None, "scan", "native"])
def test_memory_read_refuses_slots_outside_the_table(implementation):
    # the scan wrapped -1 to the last row and read NaN for slot 9 of 9 rows
    values, scores = jnp.arange(36.0).reshape(9, 4), jnp.zeros((2, 1, 2))
    for bad, shown in ((-1, "-1"), (9, "9"), (12, "12")):
        slots = jnp.array([[[0, 3]], [[bad, 1]]])
        with pytest.raises(ValueError, match=rf"slots holds {shown}: must be in \[0, 9\) "
                                             r"\(the rows of values \(9, 4\)\)"):
            memory_read(scores, slots, values, implementation=implementation)
    slots = jnp.array([[[0, 8]], [[4, 1]]])  # the edges are fine
    np.testing.assert_allclose(memory_read(scores, slots, values, implementation=implementation),
                               [[16.0, 17.0, 18.0, 19.0], [10.0, 11.0, 12.0, 13.0]])


@pytest.mark.parametrize("implementation", [None, "scan", "native"])
def test_memory_read_refuses_integer_values(implementation):
    # float weights cast to int read 0 from every row
    with pytest.raises(ValueError, match="values has dtype int32; memory_read needs floating"):
        memory_read(jnp.zeros((1, 1, 2)), jnp.array([[[0, 1]]]), jnp.ones((9, 4), jnp.int32),
                    implementation=implementation)
