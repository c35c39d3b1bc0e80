import json
import re

import pytest
from conftest import GOLDENS

from dsv3_jax import ModelConfig, RopeScaling, count_params

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
)  # fmt: skip


def test_defaults_are_the_671b_config():
    c = ModelConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.kv_lora_rank) == (
        7168,
        61,
        256,
        512,
    )
    assert c.rope_scaling.factor == 40 and c.rope_scaling.original_max_position_embeddings == 4096


def test_count_params_671b_and_37b_activated():
    from configs import deepseek_v3_671b

    total, active = count_params(ModelConfig(**deepseek_v3_671b.get_config().model))
    # Report section 1: 671B total, 37B activated per token (MTP counted apart).
    assert abs(total / 1e9 - 671) < 1.0, total
    assert abs(active / 1e9 - 37) < 1.0, active


def test_count_params_tiny_by_hand():
    c = ModelConfig(**TINY)
    d, v = 32, 64
    attn = d * 16 + 16 + 16 * 2 * 16 + d * (16 + 8) + 16 + 16 * 2 * 16 + 2 * 8 * d
    dense = 3 * d * 64 + 2 * d
    moe = d * 8 + 8 * 3 * d * 16 + 3 * d * 16 + 2 * d
    total = 2 * v * d + d + attn * 3 + dense + 2 * moe
    assert count_params(c) == (total, total - 2 * 6 * 3 * d * 16)


def test_from_hf_reads_rope_scaling_and_rope_parameters():
    official = ModelConfig.from_hf(GOLDENS / "d_yarn_mscale_official_cfg")
    modern = ModelConfig.from_hf(GOLDENS / "a_qlora_yarn_sharded_mtp" / "config.json")
    assert (
        official.rope_scaling.rope_type == "yarn"
        and official.rope_scaling.mscale == pytest.approx(0.707)
    )
    assert modern.rope_scaling == RopeScaling(
        factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0
    )
    assert modern.rope_theta == 10000.0 and modern.q_lora_rank == 24


def test_from_hf_default_rope_and_null_q_lora():
    raw = json.loads((GOLDENS / "b_qproj_vdim_dense2_nonorm" / "config.json").read_text())
    c = ModelConfig.from_hf(raw)
    assert (
        c.rope_scaling is None
        and c.q_lora_rank is None
        and c.rope_theta == raw["rope_parameters"]["rope_theta"]
    )


def test_from_hf_official_671b_dict():
    raw = ModelConfig().to_hf()
    assert ModelConfig.from_hf(raw) == ModelConfig()
    assert "rope_scaling" in raw and raw["rope_scaling"]["type"] == "yarn"


def test_dict_round_trip():
    c = ModelConfig(**TINY, dtype="bfloat16")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_attention_heads=-2), "num_attention_heads"),
        (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
        (dict(topk_group=5), "topk_group"),
        (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace"),
        (dict(rope_scaling=RopeScaling(rope_type="longrope")), "rope_type"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(dtype="float8"), "dtype"),
    ],
)
def test_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**TINY, **override})


def test_from_hf_unknown_rope_type():
    raw = ModelConfig(**TINY).to_hf()
    raw["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf(raw)


def test_from_hf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)


def test_dtype_accepts_jnp_and_numpy_types():
    import jax.numpy as jnp

    assert ModelConfig(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.float32).dtype == "bfloat16"


def test_from_hf_rejects_other_architectures():
    raw = ModelConfig(**TINY).to_hf()
    raw["model_type"] = "llama"
    with pytest.raises(ValueError, match="model_type 'llama'"):
        ModelConfig.from_hf(raw)


def test_from_hf_names_a_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_hf(tmp_path)


# ---------------------------------------------------------------- issue 8: config files' values
def test_public_functions_take_a_config_files_fields():
    """count_params & co accept get_config().model (a ConfigDict) and plain dicts of fields."""
    import jax.numpy as jnp

    from configs import deepseek_v3_671b, shakespeare
    from dsv3_jax import kv_cache_bytes_per_token
    from dsv3_jax.rope import softmax_scale

    big = deepseek_v3_671b.get_config().model
    assert count_params(big) == count_params(ModelConfig())
    assert kv_cache_bytes_per_token(big, jnp.bfloat16) == (512 + 64) * 61 * 2  # 70,272 (report)
    assert abs(softmax_scale(dict(big)) - 0.135234) < 1e-6  # V3's YaRN-scaled softmax scale
    demo = shakespeare.get_config().model
    total, active = count_params(demo)
    assert (total, active) == count_params(ModelConfig.from_dict(demo))
    assert ModelConfig.coerce(dict(TINY)) == ModelConfig(**TINY)


@pytest.mark.parametrize("bad", [3, "config.json", [("hidden_size", 32)], None])
def test_public_functions_name_the_expected_type(bad):
    from dsv3_jax import DeepseekV3, kv_cache_bytes_per_token

    for fn in (count_params, kv_cache_bytes_per_token, lambda c: DeepseekV3(c, rngs=None)):
        with pytest.raises(TypeError, match="ModelConfig or a mapping of its fields"):
            fn(bad)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        ModelConfig.from_dict({**TINY, "hiden_size": 3})


@pytest.mark.parametrize(
    "form",
    [
        # official config.json
        {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        # transformers 5.x rope_parameters (rope_theta inside is ModelConfig.rope_theta's)
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
         "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
    ],
)  # fmt: skip
def test_rope_scaling_accepts_the_config_json_dict(form):
    c = ModelConfig(rope_scaling=form)
    assert c.rope_scaling == ModelConfig().rope_scaling
    assert ModelConfig(rope_scaling={"type": "default"}).rope_scaling is None
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_rope_scaling_dict_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown keys \\['factr'\\]"):
        ModelConfig(rope_scaling={"type": "yarn", "factr": 40})
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        ModelConfig(rope_scaling={"type": "longrope", "factor": 4})
    with pytest.raises(TypeError, match="rope_scaling must be a mapping"):
        ModelConfig(rope_scaling="yarn")


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(initializer_range=-1.0), "initializer_range must be a finite number > 0, got -1.0"),
        (dict(initializer_range=float("nan")), "initializer_range must be a finite number > 0"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a finite"),
        (dict(routed_scaling_factor="2"), "routed_scaling_factor must be a finite number > 0"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a finite number > 0, got '1e-6'"),
        (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number > 0, got inf"),
        (dict(norm_topk_prob="no"), "norm_topk_prob must be True or False, got 'no'"),
        (dict(remat="yes"), "remat must be one of ('none', 'full', 'minimal', 'save_dots')"),
        (dict(n_shared_experts=True), "n_shared_experts must be a non-negative int"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "mscale": "1"}), "rope_scaling.mscale"),
        (dict(rope_scaling={"type": "yarn", "factor": -4.0}), "rope_scaling.factor must be"),
    ],
)
def test_values_of_the_wrong_kind_are_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**{**TINY, **override})


def test_count_params_beyond_int64():
    """Counted in Python ints: no silent int64 overflow for absurd sizes."""
    c = {**TINY, "vocab_size": 2**40, "hidden_size": 2**30}
    total, active = count_params(c)
    embed_and_head = 2 * 2**40 * 2**30  # 2**71 > int64
    assert total > embed_and_head > 2**63 and active > embed_and_head


@pytest.mark.parametrize("bad", ["fp32", "float8", 3, "int32"])
def test_loader_dtypes_are_named(bad):
    from dsv3_jax import load_hf_checkpoint

    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'"):
        load_hf_checkpoint(GOLDENS / "f_v3_like", dtype=bad)
