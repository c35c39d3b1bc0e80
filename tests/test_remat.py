"""Remat policies (ModelConfig.remat): same loss and gradients, less memory (report 3.2.3)."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, train_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))


def test_bools_and_names():
    assert ModelConfig(**TINY, remat=True).remat == "full"
    assert ModelConfig(**TINY, remat=False).remat == "none"
    assert ModelConfig(**TINY, remat="True").remat == "full"  # a --config.model.remat string
    assert ModelConfig(**TINY, remat="minimal").to_dict()["remat"] == "minimal"


def test_every_policy_gives_the_same_loss_and_gradients():
    tokens = np.random.default_rng(0).integers(0, 64, (2, 17)).astype(np.int32)
    weights = train_lib.LossWeights(0.3, 1e-2, 1e-3)
    results = {}
    for name in ("none", "full", "minimal", "save_dots"):
        model = DeepseekV3(ModelConfig(**TINY, remat=name, initializer_range=0.1), rngs=nnx.Rngs(0))
        graphdef, params, biases = train_lib.split_model(model)
        grad_fn = jax.jit(jax.value_and_grad(train_lib.loss_fn, has_aux=True), static_argnums=2)
        (loss, _), grads = grad_fn(params, biases, graphdef, tokens, weights)
        results[name] = [np.asarray(loss), *map(np.asarray, jax.tree.leaves(grads))]
    for name in ("full", "minimal", "save_dots"):  # reference: no remat
        for a, b in zip(results["none"], results[name], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_full_keeps_less_than_minimal_less_than_none():
    from compile_bench import v3_structure

    from dsv3_jax.train_lib import lower_train_step

    config = v3_structure(4, 64)  # as bench/compile_bench.py measures it
    temp = {
        name: lower_train_step(config.replace(remat=name), batch=8, seq_len=64)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
        for name in ("none", "minimal", "full")
    }
    assert temp["full"] < temp["minimal"] < temp["none"], temp
