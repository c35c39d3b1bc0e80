"""Train a DeepSeek-V3 on Shakespeare. Rerunning the same command resumes from the latest checkpoint.

  python train.py --config=configs/shakespeare.py --workdir=runs/shakespeare [--config.train.steps=N]
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dsv3_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("config:\n%s", _CONFIG.value)
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
