"""Streamed text == the full decode: data.StreamDecoder with the real DeepSeek-V3 tokenizer, and
sample.py's stdout for a model that emits pieces of multi-byte characters."""

import re

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_script
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_config import TINY

from dsv3_jax import DeepseekV3, ModelConfig, checkpoint, data, generate

TOKENIZER = data.load_tokenizer()
FFFD = "\ufffd"


def _byte_ids() -> list[int]:
    """The tokenizer's id of each single byte 0..255 (GPT-2 byte-to-unicode alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [TOKENIZER.token_to_id(chars[b]) for b in range(256)]


BYTE = _byte_ids()


def byte_ids(text: str) -> list[int]:
    """One id per UTF-8 byte of text (so any character can be cut anywhere)."""
    return [BYTE[b] for b in text.encode()]


def ids_of(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


def stream(ids, step_sizes, vocab=None) -> tuple[list[str], str]:
    """(the text pushed after each step, the text finish() flushes)."""
    decoder = data.StreamDecoder(TOKENIZER, vocab)
    pieces, i = [], 0
    for n in step_sizes:
        pieces.append(decoder.push(ids[i : i + n]))
        i += n
    assert i == len(ids)
    return pieces, decoder.finish()


def test_byte_ids_are_the_bytes():
    assert TOKENIZER.decode(byte_ids("héllo 🚀 日本")) == "héllo 🚀 日本"


@pytest.mark.parametrize(
    "ids, steps, pieces, tail",
    [
        # The real encoding of "🚀 ok" splits the rocket's bytes over two tokens.
        (ids_of("🚀 ok"), [1, 1, 1], ["", "🚀", " ok"], ""),
        (ids_of("🚀 ok"), [2, 1], ["🚀", " ok"], ""),
        # Generation stops inside the rocket: the tail is flushed as the decoder prints it.
        (ids_of("ok 🚀")[:-1], [1, 1, 1], ["ok", " ", ""], FFFD),
        (byte_ids("a🚀")[:3], [2, 1], ["a", ""], FFFD),
        # A literal U+FFFD is held back only until the next character shows it is one.
        (ids_of("x\ufffdy"), [1, 1, 1], ["x", "", "\ufffdy"], ""),
        (ids_of("x\ufffd"), [1, 1], ["x", ""], FFFD),
        (ids_of("x\ufffd"), [2], ["x"], FFFD),
        # An invalid byte (a lone continuation byte) decodes to U+FFFD, then a character follows.
        ([BYTE[0x80], *ids_of("ab")], [1, 1], ["", "\ufffdab"], ""),
        # CJK and accents cut byte by byte, two ids a step.
        (byte_ids("é日"), [2, 2, 1], ["é", "", "日"], ""),
        (byte_ids("ñ中"), [1, 2, 2], ["", "ñ", "中"], ""),
        # BOS/EOS print nothing, as in data.decode.
        ([data.BOS_ID, *ids_of("hi there"), data.EOS_ID], [2, 2], ["hi", " there"], ""),
    ],
)
def test_pieces_are_printed_as_soon_as_certain(ids, steps, pieces, tail):
    got, got_tail = stream(ids, steps)
    assert (got, got_tail) == (pieces, tail)
    assert "".join(got) + got_tail == data.decode(TOKENIZER, ids)


def test_compact_ids_are_mapped_back():
    ids = ids_of("café 🚀 naïve 日本語です")
    vocab = data.CompactVocab(ids)
    compact = vocab.to_compact(ids).tolist()
    assert max(compact) < 20  # really renumbered
    got, tail = stream(compact, [1] * len(compact), vocab)
    assert "".join(got) + tail == "café 🚀 naïve 日本語です"
    with pytest.raises(ValueError, match="compact ids outside"):
        data.StreamDecoder(TOKENIZER, vocab).push([len(vocab.original_ids)])


def test_finish_resets_for_the_next_stream():
    decoder = data.StreamDecoder(TOKENIZER)
    assert decoder.push(byte_ids("🚀")[:2]) == ""
    assert decoder.finish() == FFFD
    assert decoder.push(ids_of("ok")) == "ok" and decoder.finish() == ""


TEXTS = [
    "ROMEO: But, soft! what light",
    "🚀👨\u200d👩\u200d👧 café naïve 日本語です 한국어",
    "x\ufffd\ufffdy \ufffd",
    "e\u0301 a\u0308 \u00e9\u0301",  # combining accents
    "<｜User｜>hi<｜Assistant｜>",
]
# Ids a model may emit: whole words, pieces of multi-byte characters, specials, BOS/EOS.
POOL = sorted(
    {i for t in TEXTS for i in ids_of(t)}
    | {BYTE[b] for b in (0x80, 0x9F, 0xA9, 0xBD, 0xBF, 0xC3, 0xE6, 0xEF, 0xF0, 0xFF)}
    | {data.BOS_ID, data.EOS_ID}
)


@st.composite
def ids_and_steps(draw):
    """Real id sequences (a text's encoding or its bytes, or ids from POOL), cut in 1/2 steps."""
    kind = draw(st.sampled_from(["text", "bytes", "pool"]))
    if kind == "pool":
        ids = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=30))
    else:
        text = draw(st.sampled_from(TEXTS))
        ids = ids_of(text) if kind == "text" else byte_ids(text)
        ids = ids[: draw(st.integers(1, len(ids)))]  # a stop anywhere, mid-character included
    steps = []
    while sum(steps) < len(ids):
        steps.append(min(draw(st.sampled_from([1, 2])), len(ids) - sum(steps)))
    return ids, steps


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ids_and_steps())
def test_streamed_text_is_the_full_decode(case):
    ids, steps = case
    decoder = data.StreamDecoder(TOKENIZER)
    printed, i = "", 0
    for n in steps:
        printed += decoder.push(ids[i : i + n])
        i += n
        # Everything certain is printed at once: the decode so far, less trailing U+FFFD.
        assert printed == data.decode(TOKENIZER, ids[:i]).rstrip(FFFD)
    assert printed + decoder.finish() == data.decode(TOKENIZER, ids)


def test_numpy_rows_are_accepted():
    ids = np.asarray(ids_of("日本語"), np.int32)
    decoder = data.StreamDecoder(TOKENIZER)
    assert decoder.push(ids[None, :]) + decoder.finish() == "日本語"


# ------------------------------------------------------------------------------------ sample.py
@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    """A full-vocabulary tiny checkpoint whose head favours the bytes of "🚀日本語é\ufffda ".

    Sampled with top_k=6 it emits those single-byte ids in random order: characters split over
    steps, invalid bytes and (for the seed used below) a stop in the middle of a character.
    """
    path = tmp_path_factory.mktemp("byte_model")
    config = ModelConfig(**{**TINY, "vocab_size": 129_280})
    model = DeepseekV3(config, rngs=nnx.Rngs(0))
    favoured = sorted({BYTE[b] for b in "🚀日本語é\ufffda ".encode()})
    w = np.random.default_rng(0).normal(size=(config.hidden_size, config.vocab_size)) * 0.01
    w[:, favoured] *= 35
    model.lm_head.kernel[...] = jnp.asarray(w, jnp.float32)
    manager = ocp.CheckpointManager(
        checkpoint.checkpoint_dir(path),
        options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={
            "model": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )
    meta = checkpoint.meta_for(config, None, mtp=True)
    manager.save(
        0,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)), meta=ocp.args.JsonSave(meta)
        ),
    )
    manager.wait_until_finished()
    manager.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["1-token", "2-token"])
def test_sample_py_stdout_is_the_decode_of_the_generated_ids(byte_model_dir, cli_env, speculative):
    flags = ["--max_new_tokens=16", "--temperature=1.0", "--top_k=6", "--seed=0"]
    flags += ["--speculative_mtp"] * speculative
    r = run_script(["sample.py", f"--workdir={byte_model_dir}", "--prompt=日本", *flags], cli_env)
    assert r.returncode == 0, r.stderr[-3000:]
    # The same generation through the library, decoded at once.
    model, _ = checkpoint.load_checkpoint(byte_model_dir)
    prompt = data.encode_document(TOKENIZER, "日本").tolist()
    row, stats = generate(
        model, [prompt], 16, temperature=1.0, top_k=6, seed=0, eos_id=data.EOS_ID,
        speculative_mtp=speculative, return_stats=True,
    )  # fmt: skip
    text = data.decode(TOKENIZER, row[0][len(prompt) :])
    assert text.endswith(FFFD) and text.count(FFFD) >= 5  # ends mid-character, invalid bytes
    assert r.stdout == "日本" + text + "\n"
    if speculative:  # some steps really emitted two ids
        accepted = re.search(r"speculative MTP: (\d+)/", r.stderr)
        assert accepted and int(accepted.group(1)) == stats.accepted > 0
