"""Hydra at the v3 prototype scale (~29M parameters; Chaudhary & Browning 2025, v3): 8 blocks
of width 384, diagonal SSM (after a width-4 causal convolution) in every block, sparse global
attention (window 256, up to 512 global tokens) in blocks 2 and 5, a chunk-level MoE
feed-forward (4 experts, top-1, routed per 64 tokens), a 4,096-slot product-key memory in
block 3 and a 16-slot workspace. Sequences of 1,024 bytes; the long-context throughput study
runs it up to 8k."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="hydra_29m",
        model=ModelConfig(
            name="hydra", d_model=384, n_layers=8, n_heads=6, n_kv_heads=6,
            max_seq_len=8192, expand=1, hydra_ssm_conv=4, hydra_sga_every=3, hydra_window=256,
            hydra_max_global=512, hydra_curriculum="sga:500,moe:1000,memory:1500",
            moe_experts=4, moe_k=1, moe_renormalize=False, moe_every=1, moe_chunk=64,
            moe_d_ff=512,
            pkm_layers="3", pkm_slots=4096, pkm_heads=4, pkm_k_dim=128, pkm_knn=32,
            workspace_slots=16, workspace_chunk=64),
        data=DataConfig(seq_len=1024, batch_size=16),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=200),
        train=TrainConfig(steps=5000, eval_every=500, checkpoint_every=500),
    )
