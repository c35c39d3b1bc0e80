"""dsv3_jax: DeepSeek-V3 in JAX / Flax NNX.

Einsum glossary (one meaning per letter across the package): b batch, s query positions,
t key/cache positions, d hidden_size, h heads, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim,
q q_lora_rank, c kv_lora_rank, e routed experts, k experts per token, g expert groups,
f MLP/expert width, l layers (scan axis), w vocabulary.
"""

from dsv3_jax.checkpoint import load_checkpoint
from dsv3_jax.config import ModelConfig, RopeScaling
from dsv3_jax.hf_io import CheckpointError, load_hf_checkpoint
from dsv3_jax.mla import kv_cache_bytes_per_token
from dsv3_jax.model import DeepseekV3, count_params, init_model
from dsv3_jax.sampling import generate
from dsv3_jax.sharding import make_mesh, shard_model

__all__ = [
    "CheckpointError",
    "DeepseekV3",
    "ModelConfig",
    "RopeScaling",
    "count_params",
    "generate",
    "init_model",
    "kv_cache_bytes_per_token",
    "load_checkpoint",
    "load_hf_checkpoint",
    "make_mesh",
    "shard_model",
]
