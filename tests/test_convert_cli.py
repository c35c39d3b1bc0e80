"""convert.py, then sample.py and train.py on its output, as a user runs them."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

import dsv3_jax
from dsv3_jax import convert_hf
from dsv3_jax.config import ModelConfig

pytestmark = pytest.mark.slow

# configs/tiny.py's model with the full tokenizer vocabulary, as a converted HF checkpoint has.
TINY = dict(
    vocab_size=129280, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
    num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=256,
    rope_scaling=None, initializer_range=0.02, num_nextn_predict_layers=1,
)  # fmt: skip


def _run(args, env):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["DSV3_CACHE"] = str(tmp_path_factory.mktemp("tokens"))
    return e


@pytest.fixture(scope="module")
def converted(tmp_path_factory, env):
    """A tiny full-vocabulary model saved as HF files, converted by the convert.py command."""
    root = tmp_path_factory.mktemp("cli")
    model = dsv3_jax.DeepseekV3(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    convert_hf.save_hf(model, root / "hf", max_shard_size="10MB", progress=False)
    out = root / "orbax"
    args = ["convert.py", "hf_to_orbax", f"--hf_dir={root / 'hf'}", f"--output_dir={out}"]
    r = _run([*args, "--dtype=float32"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, out, args, r


def test_convert_cli_reports_progress_and_refuses_existing_output(converted, env):
    root, out, args, r = converted
    assert "hf_to_orbax" in r.stderr and "tensors" in r.stderr and "B/s" in r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "meta.json", "model"]
    before = (out / "meta.json").read_text()
    again = _run(args, env)
    assert again.returncode != 0 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert (out / "meta.json").read_text() == before
    bad = _run(["convert.py", "hf_to_orbax", f"--output_dir={root / 'x'}"], env)
    assert bad.returncode != 0 and "--hf_dir" in bad.stderr


def test_orbax_to_hf_cli(converted, env):
    root, out, _, _ = converted
    r = _run(
        ["convert.py", "orbax_to_hf", f"--checkpoint_dir={out}", f"--output_dir={root / 'back'}",
         "--max_shard_size=10MB"],
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((root / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]  # MTP back at its index


def test_sample_from_converted_checkpoint(converted, env):
    _, out, _, _ = converted
    r = _run(["sample.py", f"--checkpoint={out}", "--prompt=ROMEO:", "--max_new_tokens=4"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[checkpoint step 0, 129280 ids]" in r.stderr
    assert r.stdout.startswith("ROMEO:")


def _train_args(workdir, env, out, *extra):
    return [
        "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
        f"--config.init_from={out}", f"--config.data.cache_dir={env['DSV3_CACHE']}",
        "--config.train.steps=2", "--config.train.eval_every=100", "--config.data.eval_batch_size=2",
        *extra,
    ]  # fmt: skip


def test_train_fine_tunes_from_converted_checkpoint(converted, env, tmp_path):
    _, out, _, _ = converted
    workdir = tmp_path / "ft"
    # A learning rate of ~0: the trained weights must still be the converted ones.
    r = _run(
        _train_args(workdir, env, out, "--config.data.compact_vocab=False",
                    "--config.train.lr=1e-12", "--config.train.min_lr=0", "--config.train.bias_gamma=0"),
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialised from" in r.stderr and "with MTP" in r.stderr
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    assert metrics["step"] == 2 and np.isfinite(metrics["val_loss"])
    tuned, meta = dsv3_jax.load_checkpoint(workdir)
    base, base_meta = dsv3_jax.load_checkpoint(out, dtype=jnp.float32)
    assert meta["vocab"] is None and meta["model_config"] == base_meta["model_config"]
    for got, want in (
        (tuned.embed_tokens.embedding, base.embed_tokens.embedding),
        (tuned.moe_layers.mlp.down_proj, base.moe_layers.mlp.down_proj),
        (tuned.mtp[0].eh_proj.kernel, base.mtp[0].eh_proj.kernel),
    ):
        np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), atol=1e-6)
    half, _ = dsv3_jax.load_checkpoint(workdir, dtype=jnp.bfloat16)  # a training checkpoint too
    assert half.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert half.moe_layers.mlp.gate.kernel[...].dtype == jnp.float32


def test_train_init_from_rejects_compact_vocab(converted, env, tmp_path):
    _, out, _, _ = converted
    r = _run(_train_args(tmp_path / "w", env, out), env)  # tiny.py: data.compact_vocab=True
    assert r.returncode != 0
    assert "full tokenizer vocabulary" in r.stderr and "compact_vocab=False" in r.stderr
