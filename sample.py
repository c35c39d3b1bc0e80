"""Sample text from a trained checkpoint, streaming tokens as they are generated.

python sample.py --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200
options: --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --step=N --checkpoint=DIR
"""

import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from dsv3_jax import checkpoint, data, sampling

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A checkpoints folder or a convert.py hf_to_orbax folder (instead of --workdir).",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Prompt text (a BOS is prepended).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


class _Streamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer, vocab):
        self.tokenizer, self.vocab, self.ids, self.printed = tokenizer, vocab, [], ""

    def __call__(self, token: np.ndarray) -> None:
        tok = int(token[0])
        self.ids.append(int(self.vocab.to_original(tok)) if self.vocab else tok)
        text = data.decode(self.tokenizer, self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed) :])
            sys.stdout.flush()
            self.printed = text


def _fail(message: str):
    sys.exit(f"error: {message}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # keep orbax's INFO lines off the terminal
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        _fail("give exactly one of --workdir or --checkpoint")
    try:
        sampling.check_sampling_args(
            sys.maxsize, 1, _MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value
        )
        model, meta = checkpoint.load_checkpoint(_WORKDIR.value or _CHECKPOINT.value, _STEP.value)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if _TEMPERATURE.value == 0 and (_TOP_K.value is not None or _TOP_P.value is not None):
        print(
            "note: --temperature=0 is greedy decoding; --top_k/--top_p are ignored", file=sys.stderr
        )
    tokenizer = data.load_tokenizer()
    vocab = data.CompactVocab(meta["vocab"]) if meta.get("vocab") else None
    ids = data.encode_document(tokenizer, _PROMPT.value)
    if vocab is not None:
        unknown = vocab.missing(ids)
        if unknown.size:
            pieces = [tokenizer.decode([int(i)]) for i in unknown]
            _fail(f"the prompt uses tokens this model never saw in training: {pieces}")
        ids = vocab.to_compact(ids)
    try:
        sampling.check_sampling_args(
            model.config.max_position_embeddings,
            len(ids),
            _MAX_NEW.value,
            _TEMPERATURE.value,
            _TOP_K.value,
            _TOP_P.value,
        )
    except ValueError as err:
        _fail(str(err))
    print(f"[checkpoint step {meta['step']}, {model.config.vocab_size} ids]", file=sys.stderr)
    sys.stdout.write(_PROMPT.value)
    sampling.generate(
        model,
        ids[None, :],
        _MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        callback=_Streamer(tokenizer, vocab),
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    app.run(main)
