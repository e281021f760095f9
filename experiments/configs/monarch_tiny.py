"""The default Transformer (transformer_tiny) with Monarch matrices in place of every dense
projection of the blocks (attention q/k/v/o and the SwiGLU MLP). Four blocks per factor, as
the reference GPT-2 Monarch models use: ~1/3 of the dense projections' parameters and FLOPs at
these widths (blocks of rank 8). Embeddings and the output head stay dense."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="monarch_tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                          monarch="mlp,attention", monarch_blocks=4),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
