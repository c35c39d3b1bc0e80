import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, generate, sampling
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
        callback=lambda new: seen.extend(new[0]),
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
        (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=2, temperature=float("inf")), "temperature"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
        (dict(max_new_tokens=2, top_k=2.5), "top_k"),
        (dict(max_new_tokens=2, eos_id=10**10), "eos_id"),
        # Wrong types name the argument (a str from a config file or a command line).
        (dict(max_new_tokens="2"), "max_new_tokens must be an int, got '2'"),
        (dict(max_new_tokens=2, temperature="0.8"), "temperature must be a number >= 0, got '0.8'"),
        (dict(max_new_tokens=2, temperature=True), "temperature must be a number"),
        (dict(max_new_tokens=2, top_k="5"), "top_k must be an int or None, got '5'"),
        (
            dict(max_new_tokens=2, top_p="0.9"),
            r"top_p must be a number in \(0, 1\] or None, got '0.9'",
        ),
        (dict(max_new_tokens=2, seed="1"), "seed must be an int in .*, got '1'"),
        (dict(max_new_tokens=2, seed=1.0), "seed must be an int in .*, got 1.0"),
        (dict(max_new_tokens=2, seed=2**64), "seed must be an int in"),
        (dict(max_new_tokens=2, eos_id="1"), "eos_id must be an int or None, got '1'"),
        (dict(max_new_tokens=2, callback="print"), "callback must be callable or None"),
        (dict(max_new_tokens=2, speculative_mtp="no"), "speculative_mtp must be a bool, got 'no'"),
    ],
)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, np.array([[0, 1, 2]]), **kwargs)


def greedy_by_full_forward(model, prompt, n, eos_id=None):
    """Reference: each new token is the argmax of a full forward over everything before it."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.asarray(model(np.array([ids])))[0, -1].argmax()))
        if ids[-1] == eos_id:
            break
    return ids


def test_batched_ragged_prompts_equal_each_prompt_alone(model):
    prompts = [[0, 5, 9, 3], [0, 7], [0, *range(20, 37)]]  # lengths 4, 2, 18 (two buckets apart)
    batched = generate(model, prompts, 7)
    assert [len(r) for r in batched] == [11, 9, 25]
    for p, row in zip(prompts, batched, strict=True):
        assert row == greedy_by_full_forward(model, p, 7)
        assert generate(model, [p], 7) == [row]


def test_eos_stops_each_row(model):
    prompts = [[0, 5, 9, 3], [0, 7]]
    free = generate(model, prompts, 8)
    eos = free[0][6]  # the third new token of row 0
    out = generate(model, prompts, 8, eos_id=eos)
    for p, row in zip(prompts, out, strict=True):
        assert row == greedy_by_full_forward(model, p, 8, eos_id=eos)
    assert out[0] == free[0][:7]
    # The array form fills a finished row with eos_id.
    arr = np.asarray(generate(model, np.array([[0, 5, 9, 3]]), 8, eos_id=eos))
    np.testing.assert_array_equal(arr[0], free[0][:7] + [eos] * 5)


def test_prompt_lengths_share_one_compiled_program(model):
    generate(model, [[0, 3, 4]], 5)
    before = sampling._generate_compiled._cache_size()
    generate(model, [[0, 3, 4, 5, 6, 7]], 5)  # same bucket (16), same cache length
    generate(model, [[0, 9]], 20)  # another max_new_tokens, same cache bucket
    assert sampling._generate_compiled._cache_size() == before


def test_streamed_tokens_are_the_output(model):
    prompts = [[0, 5, 9, 3], [0, 7]]
    seen = [[], []]

    def cb(new):
        for row, toks in zip(seen, new, strict=True):
            row.extend(toks)

    out = generate(model, prompts, 6, temperature=0.9, seed=1, callback=cb)
    assert [p + s for p, s in zip(prompts, seen, strict=True)] == out


def test_generate_rejects_bad_prompts(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[0, 1], []], 2)
    with pytest.raises(ValueError, match="prompt 1 must be a flat list"):
        generate(model, [[0, 1], [0, [1, 2]]], 2)
    with pytest.raises(ValueError, match="prompt 0.*vocab_size"):
        generate(model, [[0, 99]], 2)
    with pytest.raises(ValueError, match="MTP"):
        generate(DeepseekV3(ModelConfig(**TINY), rngs=nnx.Rngs(0), mtp=False), [[0]], 2,
                 speculative_mtp=True)  # fmt: skip


# ---------------------------------------------------------------------- speculative decoding
# A 4-token vocabulary makes the random MTP module's drafts right often enough that both the
# accept and the reject paths run.
SMALL_VOCAB = dict(TINY, vocab_size=4)


@pytest.fixture(scope="module")
def small_model():
    return DeepseekV3(ModelConfig(**SMALL_VOCAB, initializer_range=0.5), rngs=nnx.Rngs(5))


def test_speculative_greedy_equals_plain_greedy(small_model):
    prompts = [[0, 1, 2, 3, 2], [0, 2], [0, 3, 3, 1, 2, 1, 0, 2, 2, 3]]
    plain = generate(small_model, prompts, 20)
    spec, stats = generate(small_model, prompts, 20, speculative_mtp=True, return_stats=True)
    assert spec == plain
    assert 0 < stats.accepted < stats.drafted, stats
    assert stats.steps < 20 and stats.new_tokens == 60
    # With an EOS stop and a budget that a 2-token step can overshoot.
    for eos, n in ((plain[0][9], 20), (None, 7)):
        assert generate(small_model, prompts, n, eos_id=eos, speculative_mtp=True) == generate(
            small_model, prompts, n, eos_id=eos
        )


def exact_continuations(model, prompt, n, temperature, top_k):
    """float64 probability of every n-token continuation, from full forwards (numpy filter)."""
    w = model.config.vocab_size
    seqs = np.array(np.meshgrid(*[range(w)] * n, indexing="ij")).reshape(n, -1).T  # [w^n, n]
    ids = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = np.asarray(model(ids), np.float64)[:, len(prompt) - 1 : -1]  # [w^n, n, w]
    prob = np.ones(len(seqs))
    for j in range(n):
        p = np_filter(logits[:, j] / temperature, top_k, None)
        prob *= p[np.arange(len(seqs)), seqs[:, j]]
    return seqs, prob


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_speculative_sampling_keeps_the_distribution(small_model, temperature, top_k):
    """Rejection sampling: 3-token continuations of 4,000 rows follow the exact distribution."""
    prompt, n, rows = [0, 2, 1], 3, 4000
    seqs, want = exact_continuations(small_model, prompt, n, temperature, top_k)
    index = {tuple(s): i for i, s in enumerate(seqs.tolist())}
    for spec in (True, False):
        out, stats = generate(small_model, [prompt] * rows, n, temperature=temperature,
                              top_k=top_k, seed=7, speculative_mtp=spec, return_stats=True)  # fmt: skip
        counts = np.bincount([index[tuple(r[3:])] for r in out], minlength=len(seqs))
        assert (counts[want == 0] == 0).all()
        expected = want * rows
        keep = expected >= 5  # Pearson chi-square over cells with enough mass
        chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        dof = keep.sum() - 1
        assert chi2 < dof + 5 * np.sqrt(2 * dof), (spec, chi2, dof)  # about 5 sigma
        if spec:
            assert 0 < stats.accepted < stats.drafted


def test_numpy_scalar_arguments_are_accepted(model):
    prompt = np.array([[0, 5, 9]])
    want = generate(model, prompt, 4, temperature=0.5, top_p=0.9, top_k=8, seed=3, eos_id=1)
    got = generate(
        model,
        prompt,
        np.int64(4),
        temperature=np.float32(0.5),
        top_p=np.float64(0.9),
        top_k=np.int32(8),
        seed=np.int64(3),
        eos_id=np.int32(1),
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_tiny_top_p_keeps_the_most_likely_token():
    """top_p below float32's normal range (flushed to 0 on the device) still keeps the argmax."""
    from dsv3_jax.sampling import filter_logits

    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 50)), jnp.float32)
    for top_p in (1e-30, 1e-40, 1e-300):
        kept = np.isfinite(np.asarray(filter_logits(logits, None, top_p)))
        np.testing.assert_array_equal(kept, np.eye(50, dtype=bool)[np.argmax(logits, -1)])
