"""Sample text from a checkpoint, streaming tokens as they are generated.

python sample.py --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200
options: --prompt may repeat (a batch of prompts of any lengths) --chat --speculative_mtp
         --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --step=N --checkpoint=DIR --verbose
         --fp8 (FP8 weights in device memory, FP8 GEMMs; see dsv3_jax.load_checkpoint)
         --mesh=data:2,expert:4 (a device mesh; as train.py's config.mesh)
         --coordinator_address=host:port --num_processes=N --process_id=I (one of N processes)
"""

import contextlib
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from dsv3_jax import checkpoint, data, distributed, sampling, sharding
from dsv3_jax.mla import kv_cache_bytes_per_token
from dsv3_jax.model import with_implementation

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A checkpoints folder or a convert.py hf_to_orbax folder (instead of --workdir).",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", ["ROMEO:"], "Prompt text (one BOS is prepended); repeat for a batch."
)
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the DeepSeek-V3 chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a prompt at the EOS token.")
_SPECULATIVE = flags.DEFINE_bool(
    "speculative_mtp", False, "Draft with the MTP module, verify with the main model."
)
_MLA_DECODE = flags.DEFINE_enum(
    "mla_decode", "absorbed", ["absorbed", "naive"], "Attention form over the latent cache."
)
_KERNEL = flags.DEFINE_enum(
    "attention_kernel", "reference", ["reference", "pallas"], "Attention implementation."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the weights' and cache's sizes and the speed to stderr."
)
_FP8 = flags.DEFINE_bool(
    "fp8",
    False,
    "FP8 inference: projections keep float8_e4m3fn weights with 128x128 block scales (those of a "
    "convert.py --keep_fp8 folder as stored; float weights quantized on load) and run as FP8 "
    "GEMMs; about half the weight memory of bf16.",
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Device mesh, e.g. data:2,expert:4 (axes data, fsdp, expert, tensor; omitted axes 1, data "
    "takes the devices the others leave, -1 marks another axis as that one). Default: one device, "
    "or every device on data with several processes.",
)
distributed.define_flags()


class _Streamer:
    """Prints row 0's text as its ids arrive (the generate callback); `finish` prints the rest.

    Every process streams (one compiled program for all), only a ``quiet=False`` one prints.
    """

    def __init__(self, tokenizer, vocab, quiet: bool = False):
        self.decoder = data.StreamDecoder(tokenizer, vocab)
        self.quiet = quiet

    def __call__(self, new: list[list[int]]) -> None:
        self._write(self.decoder.push(new[0]))

    def finish(self) -> None:
        self._write(self.decoder.finish())

    def _write(self, text: str) -> None:
        if text and not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()


def _fail(message: str):
    sys.exit(f"{distributed.log_prefix()}error: {message}")


def _native_stdout_to_stderr() -> None:
    """Several processes: native libraries' lines (gloo's "Rank i is connected ...") go to stderr,
    so stdout holds only the text (Python's sys.stdout keeps the real stdout)."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def _note(text: str) -> None:
    """A line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr)


def _weights_line(state) -> str:
    """The weights' device memory: the nbytes of every array of the model state, by dtype (a
    sharded array counts once, whatever its replication)."""
    by_dtype: dict[str, int] = {}
    for x in jax.tree.leaves(state):
        by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0) + x.nbytes
    total = sum(by_dtype.values())
    parts = ", ".join(f"{k} {v / 2**20:,.2f}" for k, v in sorted(by_dtype.items()))
    return f"[weights: {total:,} bytes = {total / 2**20:,.2f} MiB in device memory ({parts} MiB)]"


def _mesh_axes(text: str) -> dict[str, int]:
    """``data:2,expert:4`` -> {"data": 2, "expert": 4}, with data=-1 (the rest) unless given or
    another axis is -1 (``sharding.make_mesh`` checks names and sizes)."""
    axes = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition(":")
        try:
            if not sep or name in axes:
                raise ValueError
            axes[name] = int(size)
        except ValueError:
            _fail(f"--mesh={text!r}: expected axis:size pairs such as data:2,expert:4")
    if "data" not in axes and -1 not in axes.values():
        axes["data"] = -1
    return axes


def _encode(tokenizer, vocab, text: str, name: str) -> np.ndarray:
    try:
        if _CHAT.value:
            ids = data.encode_chat(tokenizer, text)
        else:
            ids = data.encode_document(tokenizer, text)
    except ValueError as err:
        _fail(f"{name}: {err}")
    if vocab is not None:
        unknown = vocab.missing(ids)
        if unknown.size:
            if _CHAT.value:
                _fail(
                    "--chat needs a checkpoint with the full tokenizer vocabulary (a converted "
                    "one); this model never saw the chat tokens in training (compact vocabulary)"
                )
            pieces = [tokenizer.decode([int(i)]) for i in unknown]
            _fail(f"{name} uses tokens this model never saw in training: {pieces}")
        ids = vocab.to_compact(ids)
    return ids


# Flags every process of a job must agree on (the rest, e.g. --process_id, differ by design).
_SHARED_FLAGS = (
    "workdir", "checkpoint", "step", "prompt", "max_new_tokens", "temperature", "top_k",
    "top_p", "seed", "speculative_mtp", "mesh", "mla_decode", "attention_kernel", "chat",
    "stop_at_eos", "fp8",
)  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # keep orbax's INFO lines off the terminal
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        _fail("give exactly one of --workdir or --checkpoint")
    axes = _mesh_axes(_MESH.value) if _MESH.value else None
    try:  # before anything touches a device
        several = distributed.initialize_from_flags()
    except ValueError as err:
        _fail(str(err))
    if several:
        _native_stdout_to_stderr()
    primary = jax.process_index() == 0  # the one process that prints
    if several:
        try:  # every process must run the same sampling: refuse differing flags at start
            settings = {n: flags.FLAGS[n].value for n in _SHARED_FLAGS}
            distributed.check_same("sample.py flag", settings)
        except ValueError as err:
            _fail(str(err))
    mesh = None
    if axes is not None or several:
        try:
            mesh = sharding.make_mesh(axes)
        except ValueError as err:
            _fail(f"--mesh: {err}")
    try:
        sampling.check_sampling_args(
            sys.maxsize,
            1,
            _MAX_NEW.value,
            _TEMPERATURE.value,
            _TOP_K.value,
            _TOP_P.value,
            _SEED.value,
        )
        model, meta = checkpoint.load_checkpoint(
            _WORKDIR.value or _CHECKPOINT.value, _STEP.value, mesh=mesh, fp8=_FP8.value
        )
    except checkpoint.DamagedCheckpointError as err:
        earlier = err.earlier_steps
        _fail(f"{err}; sample an earlier one with --step={earlier[-1]}" if earlier else str(err))
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(str(err))
    if _SPECULATIVE.value and not model.num_mtp:
        _fail("--speculative_mtp needs MTP weights, and this checkpoint has none")
    model = with_implementation(model, mla_decode=_MLA_DECODE.value, attention_kernel=_KERNEL.value)
    if _FP8.value and mesh is not None and model.config.moe_dispatch != "gspmd":
        # FP8 experts have no all-to-all path (yet): GSPMD dispatch on any mesh.
        model = with_implementation(model, moe_dispatch="gspmd")
    if _TEMPERATURE.value == 0 and (_TOP_K.value is not None or _TOP_P.value is not None):
        _note("note: --temperature=0 is greedy decoding; --top_k/--top_p are ignored")
    tokenizer = data.load_tokenizer()
    vocab = data.CompactVocab(meta["vocab"]) if meta.get("vocab") else None
    prompts = [
        _encode(tokenizer, vocab, text, "the prompt" if len(_PROMPT.value) == 1 else f"prompt {i}")
        for i, text in enumerate(_PROMPT.value)
    ]
    try:
        sampling.check_sampling_args(
            model.config.max_position_embeddings,
            max(len(ids) for ids in prompts),
            _MAX_NEW.value,
            _TEMPERATURE.value,
            _TOP_K.value,
            _TOP_P.value,
        )
    except ValueError as err:
        _fail(str(err))
    eos = data.EOS_ID if vocab is None else int(vocab.to_compact(np.array([data.EOS_ID]))[0])
    _note(f"[checkpoint step {meta['step']}, {model.config.vocab_size} ids]")
    if mesh is not None:
        _note(f"[{sharding.describe(mesh)}]")
        if _VERBOSE.value:
            for line in sharding.summary_groups(
                nnx.state(model), mesh, model.config.sharding_rules
            ):
                _note(f"  {line}")
    if _VERBOSE.value:
        _note(_weights_line(nnx.state(model)))
        cfg = model.config
        per_token = kv_cache_bytes_per_token(cfg)
        _note(
            f"[latent KV cache: {per_token:,} bytes per token = ({cfg.kv_lora_rank} + "
            f"{cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x {cfg.dtype}; "
            f"attention {cfg.mla_decode}/{cfg.attention_kernel}; {jax.default_backend()}]"
        )
    streamer = _Streamer(tokenizer, vocab, quiet=not primary) if len(prompts) == 1 else None
    if streamer is not None and primary:
        sys.stdout.write(_PROMPT.value[0])
    start = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out, stats = sampling.generate(
            model,
            [ids.tolist() for ids in prompts],
            _MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
            eos_id=eos if _STOP_AT_EOS.value else None,
            callback=streamer,
            speculative_mtp=_SPECULATIVE.value,
            return_stats=True,
        )
    seconds = time.perf_counter() - start
    if not primary:
        return
    if streamer is not None:
        streamer.finish()
        sys.stdout.write("\n")
    else:
        for i, (text, ids, row) in enumerate(zip(_PROMPT.value, prompts, out, strict=True)):
            new = np.asarray(row[len(ids) :], np.int64)
            new = vocab.to_original(new) if vocab is not None else new
            sys.stdout.write(f"--- [{i}]\n{text}{data.decode(tokenizer, new)}\n")
    if _SPECULATIVE.value and stats.drafted:
        rows = f" of {len(prompts)} rows" if len(prompts) > 1 else ""
        print(
            f"[speculative MTP: {stats.accepted}/{stats.drafted} drafts accepted "
            f"({stats.acceptance_rate:.1%}); {stats.new_tokens} tokens in {stats.steps + 1} "
            f"main-model forwards{rows}]",
            file=sys.stderr,
        )
    if _VERBOSE.value:
        print(
            f"[{stats.new_tokens} tokens in {seconds:.2f} s, {stats.new_tokens / seconds:.1f} "
            "tokens/s including compilation]",
            file=sys.stderr,
        )


if __name__ == "__main__":
    app.run(main)
