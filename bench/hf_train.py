"""The HF transformers side of ``bench/train_bench.py`` (runs in the torch venv, Python 3.11).

python bench/hf_train.py --spec=SPEC.json

SPEC.json: {"weights_dir": DIR (an HF folder written by dsv3_jax's ``save_hf``), "tokens": [[ids]]
int [b, s + 1], "threads": T, "lr": float}. Loads DeepseekV3ForCausalLM from DIR (float32, eager
attention, the default experts implementation; the MTP layer is ignored), then serves timing
requests so the driver can alternate rounds with dsv3_jax in one run: each stdin line ``N`` runs N
train steps and answers one JSON line {"seconds": [...], "loss": last loss}; ``quit`` exits. The
first line written is {"ready": ..., "first_loss": the warm-up step's loss, "torch": version, "experts": implementation} after a warm-up.

A train step: logits of tokens[:, :-1], mean next-token cross-entropy against tokens[:, 1:]
(``torch.nn.functional.cross_entropy``), backward, ``torch.optim.AdamW.step``, zero_grad.
"""

import argparse
import json
import sys
import time

import torch
import transformers
from transformers import DeepseekV3ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    model = DeepseekV3ForCausalLM.from_pretrained(
        spec["weights_dir"], dtype=torch.float32, attn_implementation="eager"
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)  # fmt: skip
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        logits = model(input_ids=inputs, use_cache=False).logits  # [b, s, w] float32
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # warm-up: allocator, AdamW state
    print(json.dumps({
        "ready": True, "first_loss": first_loss, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "experts": getattr(model.config, "_experts_implementation", "eager"),
    }), flush=True)  # fmt: skip
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        seconds, loss = [], None
        for _ in range(int(line)):
            start = time.perf_counter()
            loss = step()
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
