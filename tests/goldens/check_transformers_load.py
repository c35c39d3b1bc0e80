#!/usr/bin/env python
"""Loads an HF directory written by `convert.py orbax_to_hf` in transformers and compares its logits
with a golden (HF venv, like make_goldens.py):

    .venv-hf/bin/python tests/goldens/check_transformers_load.py DIR tests/goldens/<name>/golden.npz

Prints the max abs difference and the loading report; exits 1 unless the logits are identical.
"""

import sys

import numpy as np
import torch
from transformers import DeepseekV3ForCausalLM

torch.set_num_threads(1)


def main(path: str, golden: str) -> int:
    g = np.load(golden)
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    with torch.no_grad():
        ids = torch.from_numpy(g["input_ids"]).long()
        logits = model.eval()(input_ids=ids, use_cache=False).logits.float().numpy()
    diff = float(np.abs(logits - g["logits"]).max())
    print(
        f"{path}: max |logits - golden| = {diff:.3g}; missing {info['missing_keys']}; "
        f"unexpected {len(info['unexpected_keys'])} (MTP layers, which transformers ignores)"
    )
    return 0 if diff == 0.0 and not info["missing_keys"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
