"""Generation over the latent KV cache, fully compiled: one jitted prefill + ``lax.while_loop``.

Glossary: b batch, s prompt positions, t cache slots, w vocabulary.

The cache holds, per layer, only the normed latent c_kv [b, t, c] and the roped k_rope [b, t, r]
(V3 report section 2.1.1; ``mla.LatentCache``); decode attends over it in absorbed form by default.

Batches of prompts of different lengths are right-padded: row b's token at position p sits in cache
slot p, and a query at position p sees slots <= p only, so padding (and rejected drafts) are masked
until overwritten and never change a row's tokens. Prompt lengths are bucketed (and cache lengths
rounded up) so prompts of different lengths reuse one compiled program.

Speculative decoding with MTP (V3 report section 2.2 and 5.4.3): the first MTP module drafts one
token from the main model's last hidden state; the main model verifies [current, draft] in one
forward; greedy accepts a draft equal to the main model's argmax (output identical to plain greedy),
sampling accepts with probability min(1, p/q) and resamples rejections from max(p - q, 0)
(speculative sampling, Leviathan et al. 2023), so the output distribution is unchanged.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax import sharding
from dsv3_jax.model import DeepseekV3, check_input_ids
from dsv3_jax.sharding import constrain

_CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this
_MIN_PROMPT_BUCKET = 16  # prompt lengths are rounded up to a power of two >= this

# Donation saves a copy on GPU/TPU; the CPU backend ignores it (and would warn each compile).
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class Sampler(NamedTuple):
    """Static sampling settings (part of the compiled program's key)."""

    greedy: bool
    top_k: int | None
    top_p: float | None


def filter_logits(
    logits: jax.Array, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Masks logits [b, w] outside the top-k and/or the nucleus of mass top_p to -inf.

    Nucleus: the smallest set of most likely tokens whose probability reaches top_p (the token
    that crosses top_p is kept), as in HF ``TopPLogitsWarper``. Top-k is applied first.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [b, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        # The most likely token always stays (a top_p below float32's normal range, 1e-40 say,
        # is flushed to 0 on the device and would otherwise keep nothing).
        keep_sorted = (mass_before < top_p).at[:, 0].set(True)
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _probs(logits: jax.Array, temperature, sampler: Sampler) -> jax.Array:
    """The sampling distribution float32 [b, w] (one-hot of the argmax when greedy)."""
    if sampler.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    scaled = logits.astype(jnp.float32) / temperature
    return jax.nn.softmax(filter_logits(scaled, sampler.top_k, sampler.top_p), axis=-1)


def _draw(probs: jax.Array, key: jax.Array) -> jax.Array:
    """One id int32 [b] from each row of probs [b, w] (rows may be unnormalised, not all zero)."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _choose(logits, key, temperature, sampler: Sampler) -> jax.Array:
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _draw(_probs(logits, temperature, sampler), key)


@functools.partial(jax.jit, static_argnames=("top_k", "top_p", "greedy"))
def sample_token(logits, key, temperature, *, top_k=None, top_p=None, greedy=False):
    """Next token ids int32 [b] from logits [b, w]: argmax if greedy, else filtered sampling."""
    return _choose(logits, key, temperature, Sampler(greedy, top_k, top_p))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_sampling_args(
    max_len: int, prompt_len: int, max_new_tokens: int, temperature: float, top_k, top_p, seed=0
) -> None:
    """Raises ValueError naming the argument of the wrong type or value (see :func:`generate`)."""
    if not _is_int(seed) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an int in [-2**63, 2**63), got {seed!r}")
    if not _is_int(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if top_k is not None and not _is_int(top_k):
        raise ValueError(f"top_k must be an int or None, got {top_k!r}")
    if not _is_real(temperature):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_p is not None and not _is_real(top_p):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds max_position_embeddings {max_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


# ---------------------------------------------------------------------- streaming
class _StreamSink:
    """Routes the compiled loop's host callback to the current ``generate`` call's callback.

    The compiled program calls one fixed function (so a new callback never recompiles); calls
    are serialised by a lock, so one ``generate`` streams at a time per process.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.target: Callable[[list[list[int]]], None] | None = None
        self.rows = 0  # the caller's rows (a mesh pads the batch; padding rows are not sent)

    def __call__(self, tokens, counts) -> None:
        if self.target is not None:
            tokens, counts = np.asarray(tokens)[: self.rows], np.asarray(counts)[: self.rows]
            self.target([row[:n].tolist() for row, n in zip(tokens, counts, strict=True)])


_SINK = _StreamSink()


def _stream(tokens: jax.Array, counts: jax.Array, stream: bool) -> None:
    """Sends each row's first counts[b] of tokens [b, m] to the host callback (if streaming)."""
    if stream:
        tokens, counts = (constrain(x, (None,) * x.ndim) for x in (tokens, counts))
        io_callback(_SINK, None, tokens, counts, ordered=True)


# ---------------------------------------------------------------------- the compiled loops
class _Loop(NamedTuple):
    buf: jax.Array  # int32 [b, t]: prompt then generated tokens, by position
    n_new: jax.Array  # int32 [b]: tokens generated per row
    done: jax.Array  # bool [b]: row emitted EOS or reached max_new_tokens
    drafted: jax.Array  # int32 []: drafts verified (speculative only)
    accepted: jax.Array  # int32 []: drafts accepted
    steps: jax.Array  # int32 []: main-model decode forwards after prefill


def _put(buf, positions, tokens, mask):
    """buf [b, t] with buf[b, positions[b]] = tokens[b] where mask[b]."""
    rows = jnp.arange(buf.shape[0])
    old = buf[rows, positions]
    return buf.at[rows, positions].set(jnp.where(mask, tokens, old), mode="drop")


@functools.partial(
    jax.jit, static_argnames=("graphdef", "cache_len", "sampler", "speculative", "stream")
)
def _generate_compiled(
    graphdef,
    state,
    ids,
    lengths,
    max_new,
    key,
    temperature,
    eos_id,
    rows_asked,
    *,
    cache_len: int,
    sampler: Sampler,
    speculative: bool,
    stream: bool,
) -> _Loop:
    """Prefill + the whole token loop in one program.

    ids int32 [b, s] right-padded prompts; lengths int32 [b] (>= 1); max_new, eos_id int32 []
    (eos_id < 0: no EOS stop); temperature float32 [] (> 0 unless greedy); rows_asked int32 []:
    rows from this index on are padding (a mesh's batch multiple): done from the start, never
    counted.
    """
    model = nnx.merge(graphdef, state)
    rules = model.config.sharding_rules
    b, s = ids.shape
    rows = jnp.arange(b)
    ids = constrain(ids, ("batch", None), rules)  # rows spread over the data-parallel devices
    cache = model.init_cache(b, cache_len, mtp=speculative)
    buf = jnp.zeros((b, cache_len), jnp.int32).at[:, :s].set(ids)
    out = model.forward(ids, cache=cache, prefill=True, logits_index=lengths - 1)
    cache = out.cache
    key, sub = jax.random.split(key)
    first = _choose(out.logits[:, 0], sub, temperature, sampler)  # the token at position L
    live = (max_new > 0) & (rows < rows_asked)  # [b]
    buf = _put(buf, lengths, first, live)
    n_new = live.astype(jnp.int32)
    done = (first == eos_id) | (n_new >= max_new) | (rows >= rows_asked)
    _stream(first[:, None], n_new, stream)
    zero = jnp.int32(0)
    loop = _Loop(buf, n_new, done, zero, zero, zero)

    if not speculative:

        def body(carry):
            loop, token, cache, key = carry
            pos = lengths + loop.n_new - 1  # position of ``token``, fed now
            out = model.forward(token[:, None], positions=pos[:, None], cache=cache)
            key, sub = jax.random.split(key)
            nxt = _choose(out.logits[:, -1], sub, temperature, sampler)
            active = ~loop.done
            buf = _put(loop.buf, pos + 1, nxt, active)
            n_new = loop.n_new + active
            done = loop.done | (nxt == eos_id) | (n_new >= max_new)
            _stream(nxt[:, None], active.astype(jnp.int32), stream)
            loop = loop._replace(buf=buf, n_new=n_new, done=done, steps=loop.steps + 1)
            return loop, jnp.where(active, nxt, token), out.cache, key

        carry = (loop, first, cache, key)
        carry = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done), body, carry)
        return _replicated(carry[0])

    # Speculative: draft the token after ``first`` with MTP module 1 over the prompt.
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    next_ids = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # token at position + 1
    next_ids = next_ids.at[rows, lengths - 1].set(first)
    mtp_logits, cache = model.mtp_step(
        out.hidden, next_ids, positions, cache, prefill=True, logits_index=lengths - 1
    )
    draft_logits = mtp_logits[:, 0]  # [b, w], predicts position L + 1
    key, sub = jax.random.split(key)
    q = _probs(draft_logits, temperature, sampler)
    draft = _choose(draft_logits, sub, temperature, sampler) if sampler.greedy else _draw(q, sub)

    def spec_body(carry):
        loop, token, draft, q, cache, key = carry
        pos = lengths + loop.n_new - 1  # position of ``token`` (emitted, not yet fed)
        fed = jnp.stack([token, draft], axis=1)  # [b, 2]
        fed_pos = pos[:, None] + jnp.arange(2, dtype=jnp.int32)  # [b, 2]
        out = model.forward(fed, positions=fed_pos, cache=cache)
        key, k_accept, k_fix, k_bonus, k_draft = jax.random.split(key, 5)
        if sampler.greedy:
            t0 = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
            accept = t0 == draft
            t1 = jnp.argmax(out.logits[:, 1], axis=-1).astype(jnp.int32)
        else:
            p0 = _probs(out.logits[:, 0], temperature, sampler)  # target for position + 1
            p_d, q_d = p0[rows, draft], q[rows, draft]
            accept = jax.random.uniform(k_accept, (b,)) * q_d < p_d  # prob. min(1, p/q)
            residual = jnp.maximum(p0 - q, 0.0)
            residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p0)
            t0 = jnp.where(accept, draft, _draw(residual, k_fix))
            t1 = _draw(_probs(out.logits[:, 1], temperature, sampler), k_bonus)
        active = ~loop.done
        # Emit t0, then t1 if the draft was accepted, t0 is not EOS and the budget allows.
        second = active & accept & (t0 != eos_id) & (loop.n_new + 1 < max_new)
        buf = _put(loop.buf, pos + 1, t0, active)
        buf = _put(buf, pos + 2, t1, second)
        n_emit = active.astype(jnp.int32) + second
        n_new = loop.n_new + n_emit
        last = jnp.where(second, t1, t0)
        done = loop.done | (last == eos_id) | (n_new >= max_new)
        _stream(jnp.stack([t0, t1], axis=1), n_emit, stream)
        # MTP over both verified positions; the draft comes from the last emitted token's row.
        mtp_logits, cache = model.mtp_step(
            out.hidden,
            jnp.stack([t0, t1], axis=1),
            fed_pos,
            out.cache,
            logits_index=second.astype(jnp.int32),
        )
        draft_logits = mtp_logits[:, 0]  # [b, w]
        q = _probs(draft_logits, temperature, sampler)
        if sampler.greedy:
            new_draft = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
        else:
            new_draft = _draw(q, k_draft)
        loop = _Loop(
            buf,
            n_new,
            done,
            loop.drafted + active.sum(dtype=jnp.int32),
            loop.accepted + (active & accept).sum(dtype=jnp.int32),
            loop.steps + 1,
        )
        return loop, jnp.where(active, last, token), new_draft, q, cache, key

    carry = (loop, first, draft, q, cache, key)
    carry = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done), spec_body, carry)
    return _replicated(carry[0])


def _replicated(loop: _Loop) -> _Loop:
    """The result on every device (under a mesh), so every process can read it."""
    return jax.tree.map(lambda x: constrain(x, (None,) * x.ndim), loop)


# ---------------------------------------------------------------------- public API
def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _as_prompts(input_ids, vocab_size: int, max_len: int) -> tuple[list[np.ndarray], bool]:
    """(list of int32 [s_b] prompts, whether the input was one [b, s] array)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        prompts = []
        for i, p in enumerate(input_ids):
            try:
                p = np.asarray(p)
            except ValueError:
                p = np.asarray(p, dtype=object)
            if p.ndim != 1 or p.dtype == object:
                raise ValueError(f"prompt {i} must be a flat list of ids, got {p.tolist()!r:.80}")
            if p.size == 0:
                raise ValueError(f"prompt {i} is empty (it needs at least a BOS)")
            prompts.append(p)
        for i, p in enumerate(prompts):
            try:
                check_input_ids(p.reshape(1, -1), vocab_size, max_len)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
        return [p.astype(np.int32) for p in prompts], False
    if isinstance(input_ids, (list, tuple)) and not input_ids:
        raise ValueError("input_ids is an empty list of prompts")
    check_input_ids(input_ids, vocab_size, max_len)
    return [np.asarray(row, np.int32) for row in np.asarray(input_ids)], True


class GenerateStats(NamedTuple):
    """What a :func:`generate` call did. acceptance_rate = accepted / drafted (NaN when none)."""

    new_tokens: int  # tokens generated, all rows
    steps: int  # main-model decode forwards after the prefill
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def generate(
    model: DeepseekV3,
    input_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    callback: Callable[[list[list[int]]], None] | None = None,
    speculative_mtp: bool = False,
    return_stats: bool = False,
):
    """Generates up to ``max_new_tokens`` tokens after each prompt, in one compiled loop.

    Args:
      model: a DeepseekV3 (with MTP modules for ``speculative_mtp``). A model placed on a mesh
        (``sharding.shard_model``, the loaders' ``mesh=``) runs sharded: the rows and the latent
        cache are split over the batch axes (the batch is padded to a multiple of them; the
        padding rows are dropped), the result is replicated so every process can read it.
      input_ids: int [b, s] prompts of equal length, or a list of prompts (sequences of ids) of
        any lengths >= 1. Include the BOS yourself (exactly one; ``data.encode_document`` does).
      max_new_tokens: tokens to add per prompt (>= 0).
      temperature: 0 means greedy argmax; > 0 divides the logits before sampling.
      top_k: keep the k most likely tokens (None: all). top_p: nucleus mass in (0, 1] (None: all).
      seed: PRNG seed for sampling, an int in [-2**63, 2**63).
      eos_id: stop a row after it emits this id (kept in its output); None: never stop early.
      callback: streaming; called after each step with one list per row of the ids that row
        gained (empty for finished rows; up to 2 ids when speculating).
      speculative_mtp: draft with MTP module 1 and verify with the main model (see module doc).
        Greedy output equals plain greedy; sampled output has the same distribution.
      return_stats: also return a :class:`GenerateStats` (acceptance rate when speculating).

    Returns:
      For an array input, int32 [b, s + max_new_tokens] (prompts included; after a row's EOS the
      rest is eos_id). For a list input, one list of ids per prompt: the prompt, then its new
      tokens up to and including EOS. With ``return_stats``, a (result, stats) pair.

    Raises:
      ValueError: bad ids; an argument of the wrong type (e.g. a str temperature) or value, named
        in the message; s + max_new_tokens > max_position_embeddings; or ``speculative_mtp`` on a
        model without MTP modules.
    """
    cfg = model.config
    prompts, as_array = _as_prompts(input_ids, cfg.vocab_size, cfg.max_position_embeddings)
    lengths = np.array([len(p) for p in prompts], np.int32)
    check_sampling_args(
        cfg.max_position_embeddings,
        int(lengths.max()),
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
    )
    if eos_id is not None and not _is_int(eos_id):
        raise ValueError(f"eos_id must be an int or None, got {eos_id!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {callback!r}")
    for name, flag in (("speculative_mtp", speculative_mtp), ("return_stats", return_stats)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id must be in [0, vocab_size={cfg.vocab_size}), got {eos_id}")
    if speculative_mtp and not model.num_mtp:
        raise ValueError(
            "speculative_mtp needs MTP weights; this model has none "
            "(its checkpoint has no MTP layer, or it was loaded without them)"
        )
    if max_new_tokens == 0:
        result = jnp.asarray(np.stack(prompts)) if as_array else [p.tolist() for p in prompts]
        return (result, GenerateStats(0, 0, 0, 0)) if return_stats else result
    b_asked = len(prompts)
    if cfg.moe_capacity_factor is not None:  # a training knob: sampling is always dropless
        from dsv3_jax.model import with_implementation  # noqa: PLC0415

        model = with_implementation(nnx.merge(*nnx.split(model)), moe_capacity_factor=None)
    mesh = sharding.mesh_of(model)
    if mesh is not None:  # rows are split over the batch axes: pad to a multiple (dropped after)
        n = sharding.batch_shards(mesh, cfg.sharding_rules)
        prompts = prompts + [prompts[0]] * (-len(prompts) % n)
        lengths = np.array([len(p) for p in prompts], np.int32)
    b = len(prompts)
    s = min(_bucket(int(lengths.max()), _MIN_PROMPT_BUCKET), cfg.max_position_embeddings)
    padded = np.zeros((b, s), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    cache_len = -(-(s + max_new_tokens + 2) // _CACHE_BUCKET) * _CACHE_BUCKET
    sampler = Sampler(temperature == 0.0, top_k, top_p)
    graphdef, state = nnx.split(model)
    args = (
        padded,
        lengths,
        np.int32(max_new_tokens),
        jax.random.key(seed),
        np.float32(max(temperature, 1e-6)),
        np.int32(-1 if eos_id is None else eos_id),
        np.int32(b_asked),
    )
    if mesh is not None:  # the same host values on every process: replicated global arrays
        args = jax.device_put(args, NamedSharding(mesh, PartitionSpec()))
    with _SINK.lock, sharding.use_mesh_of(model):
        _SINK.target, _SINK.rows = callback, b_asked
        try:
            loop = _generate_compiled(
                graphdef,
                state,
                *args,
                cache_len=cache_len,
                sampler=sampler,
                speculative=speculative_mtp,
                stream=callback is not None,
            )
            buf, n_new = np.asarray(loop.buf), np.asarray(loop.n_new)
        finally:
            _SINK.target = None
    b = b_asked
    rows = [buf[i, : lengths[i] + n_new[i]] for i in range(b)]
    stats = GenerateStats(int(n_new.sum()), int(loop.steps), int(loop.drafted), int(loop.accepted))
    if as_array:
        fill = -1 if eos_id is None else eos_id
        result = np.full((b, int(lengths[0]) + max_new_tokens), fill, np.int32)
        for i, row in enumerate(rows):
            result[i, : len(row)] = row
        result = jnp.asarray(result)
    else:
        result = [row.tolist() for row in rows]
    return (result, stats) if return_stats else result
