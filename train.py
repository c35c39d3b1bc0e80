"""Train a DeepSeek-V3 on Shakespeare. Rerunning the same command resumes from the latest checkpoint.

python train.py --config=configs/shakespeare.py --workdir=runs/shakespeare [--config.train.steps=N]
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dsv3_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, TensorBoard events, logs."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines on stderr; library INFO chatter (orbax, grain) only with --verbosity=0.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("dsv3_jax")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.propagate = False
    log.info("config:\n%s", _CONFIG.value)
    try:
        trainer.train(_CONFIG.value, _WORKDIR.value)
    except trainer.RunConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
