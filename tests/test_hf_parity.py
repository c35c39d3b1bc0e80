"""Parity with HF transformers' DeepseekV3ForCausalLM (goldens from tests/goldens/make_goldens.py)."""

import json
import shutil

import numpy as np
import pytest
from conftest import GOLDENS, tol
from safetensors.numpy import load_file, save_file

from dsv3_jax import load_hf_checkpoint
from dsv3_jax.hf_io import CheckpointError
from dsv3_jax.sampling import generate


def test_logits_match_hf(golden_dir):
    g = np.load(golden_dir / "golden.npz")
    model = load_hf_checkpoint(golden_dir)
    logits = np.asarray(model(g["input_ids"]))
    assert logits.shape == g["logits"].shape
    np.testing.assert_allclose(logits, g["logits"], atol=tol("float32"), rtol=0)


def test_greedy_generate_matches_hf(golden_dir):
    g = np.load(golden_dir / "golden.npz")
    model = load_hf_checkpoint(golden_dir)
    new = g["greedy_ids"].shape[1] - g["prompt_ids"].shape[1]
    assert new >= 24
    out = np.asarray(generate(model, g["prompt_ids"], new))
    np.testing.assert_array_equal(out, g["greedy_ids"])


def test_goldens_cover_the_required_cases():
    cfgs = {
        p.name: json.loads((p / "config.json").read_text()) for p in GOLDENS.iterdir() if p.is_dir()
    }
    vals = list(cfgs.values())
    assert any(c["q_lora_rank"] is None for c in vals) and any(c["q_lora_rank"] for c in vals)
    assert any(
        c.get("rope_scaling") or (c.get("rope_parameters") or {}).get("rope_type") == "yarn"
        for c in vals
    )
    assert any(c["v_head_dim"] != c["qk_nope_head_dim"] for c in vals)
    assert {1, 2} <= {c["first_k_dense_replace"] for c in vals}
    assert any(not c["norm_topk_prob"] and c["routed_scaling_factor"] != 1 for c in vals)
    assert any(c["n_group"] > 1 for c in vals)
    neg = load_file(GOLDENS / "c_grouped_negbias" / "model.safetensors")
    biases = [v for k, v in neg.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(
        (b < -1).all() for b in biases
    )  # every biased sigmoid score is below zero


def test_bf16_checkpoint_runs_in_bf16():
    import jax.numpy as jnp

    g = np.load(GOLDENS / "g_all_moe_bf16" / "golden.npz")
    model = load_hf_checkpoint(GOLDENS / "g_all_moe_bf16", dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert model.moe_layers.mlp.gate.kernel[...].dtype == jnp.float32  # the router stays float32
    logits = np.asarray(model(g["input_ids"]))
    assert np.median(np.abs(logits - g["logits"])) < 0.05 * np.abs(g["logits"]).mean()


def test_mtp_weights_load_when_present():
    model = load_hf_checkpoint(GOLDENS / "a_qlora_yarn_sharded_mtp")
    assert model.num_mtp == 1
    g = np.load(GOLDENS / "a_qlora_yarn_sharded_mtp" / "golden.npz")
    logits, mtp = model(g["input_ids"], return_mtp=True)
    assert mtp[0].shape == (2, g["input_ids"].shape[1] - 1, logits.shape[-1])
    mtp_file = load_file(GOLDENS / "a_qlora_yarn_sharded_mtp" / "mtp.safetensors")
    np.testing.assert_array_equal(
        np.asarray(model.mtp[0].eh_proj.kernel[...]), mtp_file["model.layers.2.eh_proj.weight"].T
    )


def test_missing_mtp_loads_main_model_and_says_so(caplog):
    model = load_hf_checkpoint(GOLDENS / "c_grouped_negbias")
    assert model.num_mtp == 0
    assert "MTP" in caplog.text
    with pytest.raises(ValueError, match="no MTP"):
        model(np.zeros((1, 3), np.int32), return_mtp=True)


@pytest.fixture
def broken(tmp_path):
    src = GOLDENS / "b_qproj_vdim_dense2_nonorm"
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst, load_file(dst / "model.safetensors")


def test_missing_unexpected_and_misshaped_are_listed_together(broken):
    path, tensors = broken
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(path)
    msg = str(err.value)
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in msg and "model.norm.weight" in msg
    assert "unexpected" in msg and "model.layers.0.mlp.extra.weight" in msg


def test_shape_mismatch_names_both_shapes(broken):
    path, tensors = broken
    w = tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = w[:-1]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="kv_b_proj") as err:
        load_hf_checkpoint(path)
    assert str(tuple(w[:-1].shape)) in str(err.value)


def test_missing_shard_file(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDENS / "a_qlora_yarn_sharded_mtp", dst)
    (dst / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00005"):
        load_hf_checkpoint(dst)


def test_fused_expert_names_load_the_same(broken):
    path, tensors = broken
    golden = np.load(path / "golden.npz")
    for layer in (2,):
        p = f"model.layers.{layer}.mlp.experts."
        n = len([k for k in tensors if k.startswith(p) and k.endswith("gate_proj.weight")])
        gate = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(n)]
        up = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(n)]
        down = [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(n)]
        tensors[p + "gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)]
        )
        tensors[p + "down_proj"] = np.stack(down)
    save_file(tensors, path / "model.safetensors")
    logits = np.asarray(load_hf_checkpoint(path)(golden["input_ids"]))
    np.testing.assert_allclose(logits, golden["logits"], atol=tol("float32"), rtol=0)


def test_load_accepts_the_config_json_path():
    g = np.load(GOLDENS / "c_grouped_negbias" / "golden.npz")
    model = load_hf_checkpoint(GOLDENS / "c_grouped_negbias" / "config.json")
    np.testing.assert_allclose(
        np.asarray(model(g["input_ids"])), g["logits"], atol=tol("float32"), rtol=0
    )
