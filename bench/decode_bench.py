"""Decode speed: dsv3_jax vs HF transformers on the same model, side by side in one run.

python bench/decode_bench.py [--hf_python=.venv-hf/bin/python] [--workdir=runs/shakespeare]

1. HF: ``bench/hf_decode.py`` (in the torch venv) builds DeepseekV3ForCausalLM with the demo's
   config and random weights, saves them, and times greedy ``generate`` (KV cache, 128 new tokens)
   at batch 1 and 8.
2. dsv3_jax loads those same weights (``load_hf_checkpoint``) and times ``generate`` (one compiled
   while_loop, absorbed MLA over the latent cache) on the same prompts; it also checks that the
   greedy tokens agree with HF's.
3. With ``--workdir`` (a trained ``make demo`` run): plain greedy vs ``speculative_mtp`` greedy on
   held-out Shakespeare prompts, with the MTP acceptance rate and the speed-up.

Times are the best of ``--repeats`` runs after one warm-up (compilation excluded for both).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import shakespeare  # noqa: E402
from dsv3_jax import ModelConfig, generate, kv_cache_bytes_per_token, load_hf_checkpoint  # noqa: E402

_HF_PYTHON = flags.DEFINE_string(
    "hf_python", os.path.join(ROOT, ".venv-hf/bin/python"), "Python with torch + transformers."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained demo run for the speculative part.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt length (tokens).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best is kept).")
_VOCAB = flags.DEFINE_integer("vocab_size", 21110, "Vocabulary (the demo's compact vocabulary).")


def _best_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: compilation
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _versus_hf(tmp: str) -> list[str]:
    model_cfg = dict(shakespeare.get_config().model)
    model_cfg.update(vocab_size=_VOCAB.value, initializer_range=0.1, num_nextn_predict_layers=0)
    config = ModelConfig(**model_cfg)
    rng = np.random.default_rng(0)
    prompts = {
        b: rng.integers(2, config.vocab_size, (int(b), _PROMPT_LEN.value)).tolist()
        for b in _BATCHES.value
    }
    spec = {
        "config": {**config.to_hf(), "pad_token_id": None, "tie_word_embeddings": False},
        "weights_dir": os.path.join(tmp, "hf"),
        "prompts": prompts,
        "new_tokens": _NEW.value,
        "repeats": _REPEATS.value,
        "threads": os.cpu_count(),
    }
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "hf.json")
    json.dump(spec, open(spec_path, "w"))
    if not os.path.exists(_HF_PYTHON.value):
        sys.exit(f"error: no HF venv at {_HF_PYTHON.value}; run `make bench-decode` to create it")
    subprocess.run(
        [_HF_PYTHON.value, os.path.join(ROOT, "bench/hf_decode.py"), "--spec", spec_path,
         "--out", out_path],
        check=True,
    )  # fmt: skip
    hf = json.load(open(out_path))
    model = load_hf_checkpoint(spec["weights_dir"])
    ours_cache = kv_cache_bytes_per_token(model.config)
    lines = [
        f"model: demo config (d={config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.n_routed_experts} routed experts, vocab {config.vocab_size}), float32, random "
        f"weights; prompt {_PROMPT_LEN.value} tokens, {_NEW.value} new tokens, greedy",
        f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} cores) vs torch "
        f"{hf['torch']} ({hf['threads']} threads) + transformers",
        f"{'batch':>5} | {'dsv3_jax tok/s':>14} | {'HF tok/s':>9} | {'ratio':>6} | "
        f"{'same greedy tokens':>18} | cache B/token ours vs HF",
    ]
    for b, ids in prompts.items():
        seconds, out = _best_time(lambda ids=ids: generate(model, ids, _NEW.value), _REPEATS.value)
        ours = int(b) * _NEW.value / seconds
        h = hf["batches"][b]
        new = [row[_PROMPT_LEN.value :] for row in out]
        same = sum(
            np.cumprod(np.equal(x, y)).sum() for x, y in zip(new, h["ids"], strict=True)
        )  # tokens equal up to the first difference, per row
        lines.append(
            f"{b:>5} | {ours:>14.1f} | {h['tokens_per_s']:>9.1f} | {ours / h['tokens_per_s']:>5.1f}x"
            f" | {same:>8}/{int(b) * _NEW.value:<9} | {ours_cache:,} vs "
            f"{h['cache_bytes_per_token']:,}"
        )
    return lines


def _speculative(workdir: str) -> list[str]:
    from dsv3_jax import checkpoint, data

    model, meta = checkpoint.load_checkpoint(workdir)
    tokenizer = data.load_tokenizer()
    vocab = data.CompactVocab(meta["vocab"])
    _, held_out = data.shakespeare_texts()
    text = next(iter(held_out.values()))
    lines = [
        f"speculative MTP on {workdir} (step {meta['step']}), held-out prompts, greedy, "
        f"{_NEW.value} new tokens:"
    ]
    for b in _BATCHES.value:
        lines_ = text.splitlines()
        starts = range(500, 500 + 200 * int(b), 200)  # four whole lines every 200 lines
        prompts = [
            vocab.to_compact(
                data.encode_document(tokenizer, "\n".join(lines_[i : i + 4]) + "\n")
            ).tolist()
            for i in starts
        ]
        t_plain, plain = _best_time(lambda p=prompts: generate(model, p, _NEW.value), 2)
        t_spec, (spec, stats) = _best_time(
            lambda p=prompts: generate(
                model, p, _NEW.value, speculative_mtp=True, return_stats=True
            ),
            2,
        )
        n = int(b) * _NEW.value
        lines.append(
            f"  batch {b}: plain {n / t_plain:.1f} tok/s, speculative {n / t_spec:.1f} tok/s "
            f"({t_plain / t_spec:.2f}x); acceptance {stats.acceptance_rate:.1%} "
            f"({stats.accepted}/{stats.drafted}); {stats.steps + 1} main forwards for "
            f"{stats.new_tokens} tokens; output identical to plain greedy: {spec == plain}"
        )
    return lines


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        lines = _versus_hf(tmp)
    if _WORKDIR.value:
        lines += _speculative(_WORKDIR.value)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
