"""The default Transformer (transformer_tiny) with a mixture-of-experts feed-forward in every
other layer: 8 SwiGLU experts, top-2, dropless. Experts are half the dense width (192), so a
token's active parameters equal the dense baseline's."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="moe_tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                          moe_experts=8, moe_k=2, moe_every=2, moe_d_ff=192),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
