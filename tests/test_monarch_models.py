"""MonarchLinear, Monarch Transformers (config keys, monarch_tiny) and dense <-> Monarch
conversion of whole models, including dense-to-sparse fine-tuning through train.init_from."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from jaxsparse import configs, sparsify
from jaxsparse.config import ConfigError, apply_overrides, validate
from jaxsparse.models.registry import build
from jaxsparse.models.transformer import count_params
from jaxsparse.nn import Linear, MonarchLinear, MonarchSwiGLU, SwiGLU
from jaxsparse.ops.monarch import monarch_params, monarch_to_dense
from jaxsparse.train.loop import train


def test_monarch_linear_keeps_a_dense_layers_output_scale():
    """Per-block init: at initialisation, outputs have the variance a dense LeCun layer gives
    (Var(x)·init_scale), for square and rectangular maps and several block counts."""
    x = jax.random.normal(jax.random.key(0), (4096, 256))
    for n_out, nblocks, scale in [(256, None, 1.0), (1024, 16, 1.0), (256, 4, 0.25)]:
        layer = MonarchLinear(256, n_out, rngs=nnx.Rngs(1), nblocks=nblocks, init_scale=scale)
        var = float(jnp.var(layer(x)))
        assert abs(var / scale - 1) < 0.15, (n_out, nblocks, var)


def test_monarch_linear_is_linear_in_multi_dim_shapes_with_bias():
    layer = MonarchLinear((4, 16), (2, 32), rngs=nnx.Rngs(0), nblocks=4, use_bias=True)
    layer.bias[...] = jax.random.normal(jax.random.key(2), (2, 32))
    x = jax.random.normal(jax.random.key(3), (3, 5, 4, 16))
    dense = monarch_to_dense(layer.w1[...], layer.w2[...])  # [64, 64]
    want = (x.reshape(3, 5, 64) @ dense.T).reshape(3, 5, 2, 32) + layer.bias[...][None, None]
    np.testing.assert_allclose(layer(x), want, atol=2e-5, rtol=2e-5)
    assert layer.w1.size + layer.w2.size == monarch_params(64, 64, 4)


def test_a_multi_dim_monarch_bias_is_not_weight_decayed():
    """Biases are not decayed (train.state.decay_mask); a 2-D bias once was, taken by the
    default rule for a matrix."""
    from jaxsparse.train.state import decay_mask
    layer = MonarchLinear(64, (4, 16), rngs=nnx.Rngs(0), nblocks=4, use_bias=True)
    assert decay_mask(nnx.state(layer, nnx.Param)) == {"bias": False, "w1": True, "w2": True}


def test_to_monarch_and_to_dense_replace_layers_held_in_a_list():
    """A custom model's Linear layers in an nnx.List (setattr with an index once raised a
    TypeError); the converted model computes what the dense one does."""

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([Linear(16, 16, rngs=nnx.Rngs(i), logical_axes=(None, None))
                                    for i in range(2)])

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack()
    sparse = sparsify.to_monarch(model, lambda path, module: True, nblocks=4)
    assert all(isinstance(layer, MonarchLinear) for layer in sparse.layers)
    dense = sparsify.to_dense(sparse, lambda path, module: True)
    assert all(isinstance(layer, Linear) for layer in dense.layers)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    np.testing.assert_allclose(dense(x), sparse(x), atol=1e-5, rtol=1e-5)


def test_monarch_swiglu_has_monarch_projections():
    mlp = MonarchSwiGLU(128, 384, rngs=nnx.Rngs(0), nblocks=4)
    assert isinstance(mlp, SwiGLU)
    assert all(isinstance(p, MonarchLinear) for p in (mlp.gate, mlp.up, mlp.down))
    assert mlp(jnp.ones((2, 3, 128))).shape == (2, 3, 128)


def test_monarch_tiny_replaces_every_block_projection():
    cfg = configs.get("monarch_tiny")
    model = build(cfg.model, nnx.Rngs(0))
    kinds = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (Linear, MonarchLinear)):
            kinds[path] = type(module).__name__
    assert kinds.pop(("lm_head",)) == "Linear"
    assert set(kinds.values()) == {"MonarchLinear"} and len(kinds) == 4 * 7
    dense = count_params(configs.get("transformer_tiny").model)
    assert count_params(cfg.model) < 0.5 * dense


def test_monarch_config_errors_name_the_key_and_valid_values():
    with pytest.raises(ConfigError, match=r"model.monarch='ffn'"):
        validate(tiny_config("model.monarch=ffn"))
    with pytest.raises(ConfigError, match=r"model.monarch_blocks=3 .*valid: \[1, 2, 4\]"):
        validate(tiny_config("model.monarch=mlp", "model.monarch_blocks=3"))
    with pytest.raises(ConfigError, match=r"model.monarch_impl='cuda'"):
        validate(tiny_config("model.monarch=mlp", "model.monarch_impl=cuda"))


def test_to_monarch_projects_and_to_dense_inverts_exactly():
    cfg = tiny_config().model
    model = build(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    sparse = sparsify.to_monarch(model, "mlp", nblocks=4)
    assert isinstance(sparse.blocks[0].mlp.gate, MonarchLinear)
    assert isinstance(sparse.blocks[0].attn.q_proj, Linear)  # not selected
    assert isinstance(model.blocks[0].mlp.gate, Linear)  # the argument is untouched
    # The projection of each layer is the optimal one.
    gate = model.blocks[0].mlp.gate
    dense_gate = gate.kernel[...].T
    projected = monarch_to_dense(sparse.blocks[0].mlp.gate.w1[...], sparse.blocks[0].mlp.gate.w2[...])
    perturbed = projected + 1e-2 * jax.random.normal(jax.random.key(2), projected.shape)
    assert jnp.linalg.norm(projected - dense_gate) < jnp.linalg.norm(perturbed - dense_gate)
    back = sparsify.to_dense(sparse)
    np.testing.assert_allclose(back(tokens), sparse(tokens), atol=1e-4, rtol=1e-4)
    # Monarch -> dense -> Monarch is exact (the dense matrices are exactly Monarch).
    again = sparsify.to_monarch(back, "mlp", nblocks=4)
    np.testing.assert_allclose(again(tokens), sparse(tokens), atol=1e-4, rtol=1e-4)


def test_monarch_linear_refuses_logical_axes_of_the_wrong_length():
    """As Linear does: the bias and to_dense's dense layer take their axis names from them."""
    with pytest.raises(ValueError, match=r"logical_axes \('embed',\) must name each of the "
                       r"dims \(16, 32\)"):
        MonarchLinear(16, 32, rngs=nnx.Rngs(0), use_bias=True, logical_axes=("embed",))
    MonarchLinear(16, 32, rngs=nnx.Rngs(0), use_bias=True, logical_axes=("embed", "mlp"))


def test_to_monarch_refuses_an_unknown_selection():
    model = build(tiny_config().model, nnx.Rngs(0))
    with pytest.raises(ValueError, match="which='ffn'"):
        sparsify.to_monarch(model, "ffn")
    with pytest.raises(ValueError, match=r"which=\['mlp'\]: 'all', a comma-separated subset"):
        sparsify.to_monarch(model, ["mlp"])  # was an AttributeError on .split


def test_dense_to_monarch_fine_tuning_via_init_from(tmp_path):
    dense_cfg = tiny_config("train.steps=4")
    train(dense_cfg, tmp_path / "dense", sample=False, quiet=True)
    sparse_cfg = apply_overrides(dense_cfg, ["model.monarch=mlp,attention",
                                             "model.monarch_blocks=4",
                                             f"train.init_from={tmp_path / 'dense'}"])
    result = train(sparse_cfg, tmp_path / "sparse", sample=False, quiet=True)
    assert result.step == 4 and np.isfinite(list(result.losses.values())).all()
    # Step 0 of the sparse run evaluates the projected dense model, not a random one:
    # near the dense run's final loss, far from a fresh model's ~5.5 nats.
    dense_final = json.loads((tmp_path / "dense" / "final_metrics.json").read_text())
    first_sparse = [json.loads(line) for line in
                    (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in first_sparse if r.get("split") == "eval")
    assert first_eval["loss"] < dense_final["loss"] + 1.0
    mismatch = apply_overrides(sparse_cfg, ["model.d_ff=96"])
    with pytest.raises(ConfigError, match=r"model.d_ff differs \(64 in the source run, 96 here\)"):
        train(mismatch, tmp_path / "bad", sample=False, quiet=True)


@pytest.mark.parametrize("name", ["transformer_tiny", "monarch_tiny", "moe_tiny"])
def test_projection_flops_count_two_per_weight_a_token_uses(name):
    from jaxsparse.models.transformer import projection_flops_per_token

    cfg = configs.get(name).model
    model = build(cfg, nnx.Rngs(0))
    used = 0
    for path, module in nnx.iter_modules(model):
        if path[:1] != ("blocks",):
            continue
        if isinstance(module, Linear) and "router" not in path:
            used += module.kernel.size
        elif isinstance(module, MonarchLinear):
            used += module.w1.size + module.w2.size
    if cfg.moe_experts:  # expert weights live in the MoE layer: count the k a token uses
        per_expert = 3 * cfg.d_model * (cfg.moe_d_ff or cfg.d_ff)
        used += (cfg.n_layers // cfg.moe_every) * cfg.moe_k * per_expert
    assert projection_flops_per_token(cfg) == 2 * used


def test_an_output_head_with_float32_logits_is_not_converted_silently():
    """A head returning float32 logits from bfloat16 matmuls (``Linear(out_dtype=float32)``)
    came back from Monarch and back to dense returning bfloat16-rounded logits."""
    head = Linear(16, 32, logical_axes=("embed", "vocab"), rngs=nnx.Rngs(0),
                  dtype=jnp.bfloat16, out_dtype=jnp.float32)
    assert head(jnp.ones((2, 16))).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"linear_to_monarch: this Linear returns "
                                         r"out_dtype=.*float32.*leave it dense"):
        sparsify.linear_to_monarch(head)
