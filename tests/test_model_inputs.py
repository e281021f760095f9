"""A model built straight from a ``ModelConfig`` (``jaxsparse.models.build``, without
``jaxsparse.config.validate``) is checked like a validated one: an impossible config raises
the ConfigError that names ``model.<key>``, its value and what is allowed, before anything is
built, instead of building something else (no blocks, a smaller memory) or failing inside a
layer (ZeroDivisionError, numpy's TypeError)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import configs, models
from jaxsparse.config import ConfigError, ModelConfig, apply_overrides, validate, validate_model

TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
HYDRA = dict(TINY, name="hydra", hydra_window=4, hydra_max_global=4)

BAD = [
    (dict(TINY, n_layers=0), r"model.n_layers=0: must be >= 1"),
    (dict(TINY, n_layers=-2), r"model.n_layers=-2: must be >= 1"),
    (dict(TINY, moe_experts=2, moe_k=1, moe_every=0), r"model.moe_every=0: must be >= 1"),
    (dict(TINY, dtype="bf16"), r"model.dtype='bf16': allowed \('float32', 'bfloat16', "
                               r"'float16'\)"),
    (dict(TINY, d_model=34, n_heads=4), r"model.d_model=34 is not divisible by model.n_heads=4"),
    (dict(TINY, moe_experts=2, moe_k=3), r"model.moe_k=3: must be in \[1, model.moe_experts=2\]"),
    (dict(TINY, name="transfromer"), r"model.name='transfromer' is not a registered model\. "
                                     r"Did you mean 'transformer'"),
    (dict(HYDRA, hydra_sga_every=0), r"model.hydra_sga_every=0: must be >= 1"),
    (dict(HYDRA, hydra_max_global=-3), r"model.hydra_max_global=-3: the global-token budget "
                                       r"must be >= 0"),
    (dict(HYDRA, pkm_layers="0", pkm_slots=1000),
     r"model.pkm_slots=1000: must be a perfect square"),
    (dict(HYDRA, hydra_curriculum="sga:10,sga:20"),
     r"model.hydra_curriculum='sga:10,sga:20': component 'sga' is staged twice"),
    (dict(TINY, n_layers=2.0), r"model.n_layers=2.0: expected <class 'int'>"),
]


@pytest.mark.parametrize("kw, message", BAD)
def test_build_refuses_an_impossible_model_config_naming_the_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        models.build(ModelConfig(**kw), nnx.Rngs(0))
    with pytest.raises(ConfigError, match=message):  # what validate says of it, word for word
        validate_model(ModelConfig(**kw))


@pytest.mark.parametrize("name, override, message", [
    ("transformer_tiny", "model.n_layers=0", r"model.n_layers=0: must be >= 1"),
    ("moe_tiny", "model.moe_every=0", r"model.moe_every=0: must be >= 1"),
    ("hydra_tiny", "model.pkm_slots=1000", r"model.pkm_slots=1000: must be a perfect square"),
])
def test_validate_and_build_give_the_same_error(name, override, message):
    cfg = apply_overrides(configs.get(name), [override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    with pytest.raises(ConfigError, match=message):
        models.build(cfg.model, nnx.Rngs(0))


def test_the_data_dependent_checks_stay_with_validate():
    """``hydra_max_global`` above ``data.seq_len`` is a fine model (it may train on longer
    sequences): build takes it, validate refuses it for this run."""
    cfg = apply_overrides(configs.get("hydra_tiny"), ["model.hydra_max_global=200",
                                                      "data.seq_len=128"])
    assert validate_model(cfg.model) is cfg.model
    assert isinstance(nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0))), nnx.Module)
    with pytest.raises(ConfigError, match=r"model.hydra_max_global=200: the global-token budget "
                                          r"must be in \[0, data.seq_len=128\]"):
        validate(cfg)


def test_a_valid_config_builds_as_before():
    m = models.build(ModelConfig(**TINY), nnx.Rngs(0))
    assert len(m.blocks) == 1
    hydra = dataclasses.replace(ModelConfig(**HYDRA), pkm_layers="0", pkm_slots=64, pkm_knn=4,
                                pkm_k_dim=8, pkm_heads=2)
    assert models.build(hydra, nnx.Rngs(0)).blocks[0].pkm.values.shape[0] == 64


def test_traced_token_ids_out_of_range_embed_as_nan_not_as_another_token():
    """Under jit ids cannot be refused: a negative one wrapped around to the table's last row
    (finite, wrong logits: 1.35 off in transformer_tiny); out of range either way it is NaN
    now, as ids past the table already were. Eager calls are refused by name."""
    from jaxsparse.nn.embedding import Embed

    embed = Embed(4, 2, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, t: m(t))(embed, jnp.array([[-1, 3, 4]]))
    assert np.isnan(out[0, 0]).all() and np.isnan(out[0, 2]).all()
    np.testing.assert_array_equal(out[0, 1], embed.embedding[...][3])
    with pytest.raises(ValueError, match=r"tokens range over \[-1, 3\]; the vocabulary is "
                                         r"\[0, 4\)"):
        embed(jnp.array([[-1, 3]]))


def test_a_list_of_tokens_and_a_cache_of_another_batch_are_named():
    model = models.build(ModelConfig(**TINY), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens must be an integer \[batch, length\] array, "
                                         r"got list"):
        model([[1, 2, 3]])  # was an AttributeError on .ndim
    # empty: attention models named attention's own q / k_new, Mamba-2 returned empty logits
    for name in ("transformer_tiny", "mamba2_tiny"):
        built = model if name == "transformer_tiny" else models.build(
            configs.get(name).model, nnx.Rngs(0))
        for empty in (jnp.zeros((1, 0), jnp.int32), jnp.zeros((0, 3), jnp.int32)):
            with pytest.raises(ValueError, match=rf"tokens of shape \[{empty.shape[0]}, "
                                                 rf"{empty.shape[1]}\]: the batch and the length "
                                                 "must each be >= 1"):
                built.decode(empty, built.init_cache(1, 8))
            with pytest.raises(ValueError, match=r"the batch and the length must each be >= 1"):
                built(empty)
    # a recurrent cache made for 2 rows, decoding 1: was "state must be (1, 3, 64), got (2, 3,
    # 64)", as if the cache and not the input were off
    for name in ("mamba_tiny", "mamba2_tiny"):
        mamba = models.build(configs.get(name).model, nnx.Rngs(0))
        with pytest.raises(ValueError, match=r"cache\['conv'\] of shape \(2, .*made for another "
                                             r"batch size than the input's 1"):
            mamba.decode(jnp.zeros((1, 3), jnp.int32), mamba.init_cache(2, 8))


def test_layers_refuse_an_odd_rotary_head_dim_and_integer_workspace_inputs_when_used():
    """An odd head dim was accepted when the attention layers were built and refused only at
    their first call (inside a jitted step, say); the workspace cast its float32 reads back
    to an integer input's dtype, cutting their fractions."""
    from jaxsparse.nn import RoutingAttention, SparseGlobalAttention, WorkspaceMemory
    from jaxsparse.nn.attention import Attention

    rngs = nnx.Rngs(0)
    for build in (lambda: Attention(16, 2, 2, 7, rngs=rngs),
                  lambda: Attention(16, 2, 2, np.int64(7), rngs=rngs),
                  lambda: SparseGlobalAttention(16, 2, 2, 7, window=4, max_global=2, rngs=rngs),
                  lambda: RoutingAttention(16, 2, 7, rngs=rngs, routing_heads=1, num_clusters=2,
                                           window=4, local_window=4)):
        with pytest.raises(ValueError, match=r"head_dim=7: rotary embeddings need an even"):
            build()
    workspace = WorkspaceMemory(16, 4, 4, rngs=rngs)
    ints = jnp.ones((2, 12, 16), jnp.int32)
    for call in (lambda: workspace(ints), lambda: workspace.decode(ints, workspace.init_cache(2), 0)):
        with pytest.raises(ValueError, match=r"x has dtype int32; the workspace reads "
                                             "floating-point inputs"):
            call()
    assert workspace(ints.astype(jnp.float32)).dtype == jnp.float32
