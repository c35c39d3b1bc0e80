"""A tiny DeepSeek-V3 on Shakespeare for tests and smoke runs (under a minute per run on a 2-core CPU, mostly compilation)."""

from configs import shakespeare


def get_config():
    c = shakespeare.get_config()
    c.model.update(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=256,
    )  # fmt: skip
    c.data.update(seq_len=32, eval_batch_size=256)
    c.train.update(
        steps=8, batch_size=4, warmup_steps=2, log_every=2, eval_every=8, save_every=2, keep=2
    )
    return c
