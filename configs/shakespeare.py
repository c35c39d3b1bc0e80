"""A small DeepSeek-V3 (MLA, DeepSeekMoE with shared + routed experts, group-limited routing, MTP)
trained on Shakespeare on a 2-core CPU in about 11 minutes: the `make demo` config. It follows the
report's schedules (section 4.2) scaled to 600 steps: warmup, constant, then cosine learning rate;
the MTP weight lambda 0.3, then 0.1 for the last 32% of the steps (report: the last 4.8T of 14.8T
tokens); the bias update speed gamma, then 0 for the last 3.4% (report: the last 500B tokens).

The output layer dominates a model this small, so the demo uses the compact vocabulary of the ids
that occur in the corpus (the real tokenizer still maps text to ids and back; the mapping is saved
with every checkpoint). Everything else keeps the full 129,280-id vocabulary.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=129280,  # replaced by the compact vocabulary's size when data.compact_vocab
            hidden_size=128,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            first_k_dense_replace=1,
            num_attention_heads=4,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            num_nextn_predict_layers=1,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            rope_scaling=None,  # plain RoPE: the demo's context is far below 4096
            initializer_range=0.02,
            dtype="float32",  # bf16 matmuls are slow on CPU; use "bfloat16" on GPU/TPU
            param_dtype="float32",
            remat="none",  # or "full", "minimal", "save_dots" (dsv3_jax.model.REMAT_POLICIES)
            # Routed tokens on a mesh with an expert axis: "auto" = all-to-all in shard_map
            # (dsv3_jax.moe); "gspmd" = one global sort. Capacity None = dropless.
            moe_dispatch="auto",
            moe_capacity_factor=ml_collections.config_dict.placeholder(float),
            # FP8 training (report 3.3; dsv3_jax.fp8): every linear but the embedding, head and
            # router as block-scaled e4m3 GEMMs (Fprop, Dgrad, Wgrad), AdamW moments in bf16.
            fp8_training=False,
            fp8_kernel="reference",  # or "pallas" (interpret mode on CPU: slow)
        )
    )
    # Fine-tune from a checkpoint (convert.py hf_to_orbax output, a training run, an HF folder);
    # its architecture replaces c.model's (dtype, param_dtype, remat, moe_impl still apply).
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.data = ml_collections.ConfigDict(
        dict(cache_dir=".cache/tokens", compact_vocab=True, seq_len=128, eval_batch_size=64)
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=600,
            batch_size=16,
            # Learning rate (report 4.2): linear warmup over warmup_steps to lr, constant until
            # decay_start_fraction of the steps, then cosine down to min_lr at the last step.
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=50,
            decay_start_fraction=0.4,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_embeddings=False,
            clip=1.0,
            # Gradient accumulation: each step's batch runs as this many micro-batches inside one
            # jitted step (same loss, gradients and expert loads as the whole batch at once).
            microbatches=1,
            # Batch-size ramp (report 4.2: 3,072 -> 15,360 sequences over the first 469B tokens):
            # from batch_size_ramp_start rows at step 0 up to batch_size at batch_size_ramp_steps,
            # in batch_size_ramp_stages equal spans of steps, then batch_size (at most stages + 1
            # sizes, each rounded to micro-batches x batch shards; one compile each). 0: no ramp.
            # The demo has none: each size's compile would cost seconds of its budget.
            batch_size_ramp_start=0,
            batch_size_ramp_steps=0,
            batch_size_ramp_stages=4,
            # MTP weight lambda (report 4.2: 0.3 for the first 10T of 14.8T tokens, then 0.1): it
            # is mtp_lambda_final for the last mtp_lambda_final_fraction of the steps (0: never).
            mtp_lambda=0.3,
            mtp_lambda_final=0.1,
            mtp_lambda_final_fraction=0.32,
            balance_alpha=1e-4,
            # Bias update speed gamma (report 4.2: 0.001, then 0 for the last 500B tokens): 0 for
            # the last bias_gamma_final_fraction of the steps (0: never).
            bias_gamma=1e-3,
            bias_gamma_final_fraction=0.034,
            seed=0,
            # A step with a non-finite loss or gradient norm stops the run; with skip_nonfinite it
            # is skipped (no update), unless more than max_consecutive_skips come in a row.
            skip_nonfinite=False,
            max_consecutive_skips=10,
            log_every=20,
            eval_every=120,
            save_every=120,
            keep=3,
        )
    )
    # Device mesh (dsv3_jax/sharding.py): devices per axis, their product = every process's
    # devices together. -1 (one axis at most) takes the devices the others leave: the default
    # puts them all on data. E.g. --config.mesh.expert=4 on 8 devices: data=2, expert=4.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    return c
