"""Convert DeepSeek-V3 checkpoints between the HF layout (official FP8 included) and orbax.

python convert.py hf_to_orbax --hf_dir=DIR --output_dir=OUT [--dtype=bfloat16|float32] [--keep_fp8]
    [--drop_mtp] [--overwrite]
python convert.py orbax_to_hf --checkpoint_dir=CKPT --output_dir=OUT [--max_shard_size=5GB] [--fp8]
    [--overwrite]

OUT of hf_to_orbax is what `train.py --config.init_from=OUT`, `sample.py --checkpoint=OUT` and
`dsv3_jax.load_checkpoint(OUT)` read. Memory stays about two layers, whatever the model size.
"""

import logging
import platform
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging

from dsv3_jax import convert_hf
from dsv3_jax.hf_io import CheckpointError

_HF_DIR = flags.DEFINE_string("hf_dir", None, "hf_to_orbax: the HF checkpoint directory.")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "orbax_to_hf: a converted folder or a training workdir/checkpoint."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "The folder to create.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "hf_to_orbax: stored dtype."
)
_KEEP_FP8 = flags.DEFINE_bool("keep_fp8", False, "hf_to_orbax: keep FP8 weights and scales.")
_DROP_MTP = flags.DEFINE_bool("drop_mtp", False, "hf_to_orbax: leave the MTP layers out.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "orbax_to_hf: shard size limit.")
_FP8 = flags.DEFINE_bool("fp8", False, "orbax_to_hf: write official block-FP8 weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")

_COMMANDS = ("hf_to_orbax", "orbax_to_hf")


def main(argv):
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(_COMMANDS)}; got {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # keep orbax's INFO lines off the terminal
    log = logging.getLogger("dsv3_jax")
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
    log.propagate = False
    log.info("jax %s, python %s", jax.__version__, platform.python_version())
    command, out = argv[1], _OUTPUT_DIR.value
    try:
        if not (out or "").strip():
            raise ValueError("--output_dir is required (got none or an empty path)")
        if command == "hf_to_orbax":
            if not (_HF_DIR.value or "").strip():
                raise ValueError("hf_to_orbax needs --hf_dir")
            r = convert_hf.hf_to_orbax(
                _HF_DIR.value,
                out,
                dtype=_DTYPE.value,
                keep_fp8=_KEEP_FP8.value,
                drop_mtp=_DROP_MTP.value,
                overwrite=_OVERWRITE.value,
                progress=_PROGRESS.value,
            )
        else:
            if not (_CHECKPOINT_DIR.value or "").strip():
                raise ValueError("orbax_to_hf needs --checkpoint_dir")
            r = convert_hf.orbax_to_hf(
                _CHECKPOINT_DIR.value,
                out,
                max_shard_size=_MAX_SHARD.value,
                fp8=_FP8.value,
                overwrite=_OVERWRITE.value,
                progress=_PROGRESS.value,
            )
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    log.info(
        "%s: %d tensors, %.2f GB in %.1f s (%.2f GB/s) -> %s",
        command,
        r["tensors"],
        r["bytes"] / 1e9,
        r["seconds"],
        r["bytes"] / 1e9 / max(r["seconds"], 1e-9),
        out,
    )


if __name__ == "__main__":
    app.run(main)
