import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, generate
from dsv3_jax.sampling import filter_logits, sample_token


def np_filter(logits, top_k, top_p):
    """float64 reference of the filtered sampling distribution (HF TopK then TopP warpers)."""
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k is not None:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p is not None:
            order = np.argsort(-row)
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            before = np.cumsum(p) - p
            row[order[before >= top_p]] = -np.inf
    p = np.exp(out - out.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "top_k, top_p", [(None, None), (5, None), (None, 0.6), (7, 0.9), (1, None), (None, 1e-6)]
)
def test_filter_logits_matches_reference(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 20)) * 2
    got = jax.nn.softmax(filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p), -1)
    np.testing.assert_allclose(np.asarray(got), np_filter(logits, top_k, top_p), atol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = np.random.default_rng(1).normal(size=(1, 12)).astype(np.float32)
    n = 20000
    tokens = jax.vmap(
        lambda k: sample_token(jnp.asarray(logits), k, jnp.float32(0.7), top_k=6, top_p=0.9)
    )(jax.random.split(jax.random.key(0), n))
    freq = np.bincount(np.asarray(tokens).reshape(-1), minlength=12) / n
    want = np_filter(logits / 0.7, 6, 0.9)[0]
    assert (freq[want == 0] == 0).all()
    sigma = np.sqrt(want * (1 - want) / n)
    assert (np.abs(freq - want) <= 4 * sigma + 1e-3).all(), (freq, want)


@pytest.fixture(scope="module")
def model():
    return DeepseekV3(ModelConfig(**TINY, initializer_range=0.3), rngs=nnx.Rngs(0))


def test_greedy_generate_equals_argmax_of_full_forward(model):
    prompt = np.array([[0, 5, 9, 3], [0, 7, 7, 1]])
    out = np.asarray(generate(model, prompt, 6))
    assert out.shape == (2, 10) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :4], prompt)
    for t in range(4, 10):  # each new token is the argmax given everything before it
        np.testing.assert_array_equal(out[:, t], np.asarray(model(out[:, :t]))[:, -1].argmax(-1))


def test_sampling_is_seeded_and_streams(model):
    prompt = np.array([[0, 5, 9]])
    seen = []
    a = generate(
        model,
        prompt,
        8,
        temperature=1.0,
        top_k=10,
        seed=3,
        callback=lambda t: seen.append(int(t[0])),
    )
    b = generate(model, prompt, 8, temperature=1.0, top_k=10, seed=3)
    c = generate(model, prompt, 8, temperature=1.0, top_k=10, seed=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert seen == np.asarray(a)[0, 3:].tolist()
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=62), "max_position_embeddings"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, np.array([[0, 1, 2]]), **kwargs)
