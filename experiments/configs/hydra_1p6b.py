"""Hydra's design envelope (~1.6B parameters; Chaudhary & Browning 2025): 24 blocks of width
2048, diagonal SSM everywhere (after a width-4 causal convolution, as in Mamba), sparse global
attention (window 256, up to 512 global tokens) in every third block, a chunk-level MoE
feed-forward (8 experts, top-2, routed per 64 tokens), 65,536-slot product-key memories in
blocks 8 and 16 and a 32-slot workspace. The paper leaves the tokenizer open; a 32k vocabulary
is assumed here. Meant for a pod: `jaxsparse configs` prints its parameter accounting and
`jaxsparse dryrun` its per-device memory on a 64-device mesh, both without allocating."""

from jaxsparse.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig,
                              TrainConfig)


def get_config() -> Config:
    return Config(
        name="hydra_1p6b",
        model=ModelConfig(
            name="hydra", vocab_size=32_000, d_model=2048, n_layers=24, n_heads=16,
            n_kv_heads=16, max_seq_len=8192, expand=1, tie_embeddings=True,
            dtype="bfloat16", remat=True, hydra_ssm_conv=4, hydra_sga_every=3, hydra_window=256,
            hydra_max_global=512,
            hydra_curriculum="sga:2000,moe:4000,memory:6000",
            moe_experts=8, moe_k=2, moe_every=1, moe_chunk=64, moe_d_ff=512,
            pkm_layers="8,16", pkm_slots=65_536, pkm_heads=4, pkm_k_dim=256, pkm_knn=32,
            workspace_slots=32, workspace_chunk=256),
        data=DataConfig(seq_len=4096, batch_size=256),
        mesh=MeshConfig(data=8, fsdp=8, expert=1),
        optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, eval_every=2000, checkpoint_every=1000,
                          loss_chunk=512),
    )
