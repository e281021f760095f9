"""The dense baseline at Hydra's design envelope: a plain Transformer of the same width, depth,
vocabulary, sequence length and batch as `hydra_1p6b` (24 blocks of width 2048, 16 heads,
SwiGLU d_ff 5504, causal attention), for the scale-out tables (`jaxsparse dryrun`,
experiments/scale/). Meant for a pod, not for this machine."""

from jaxsparse.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig,
                              TrainConfig)


def get_config() -> Config:
    return Config(
        name="transformer_1p3b",
        model=ModelConfig(
            name="transformer", vocab_size=32_000, d_model=2048, n_layers=24, n_heads=16,
            n_kv_heads=16, d_ff=5504, max_seq_len=8192, tie_embeddings=True, dtype="bfloat16",
            remat=True),
        data=DataConfig(seq_len=4096, batch_size=256),
        mesh=MeshConfig(data=8, fsdp=8),
        optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, eval_every=2000, checkpoint_every=1000,
                          loss_chunk=512),
    )
