"""Train a DeepSeek-V3 on Shakespeare. Rerunning the same command resumes from the latest checkpoint.

python train.py --config=configs/shakespeare.py --workdir=runs/shakespeare [--config.train.steps=N]
  [--config.mesh.expert=4 ...]  a device mesh (configs/shakespeare.py: mesh)
  [--coordinator_address=host:port --num_processes=N --process_id=I]  one of N processes
"""

import logging
import os
import re
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dsv3_jax import checkpoint, distributed, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, TensorBoard events, logs."
)
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a bad config file or config field is one line, not a traceback."""
    try:
        rest = app.parse_flags_with_usage(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises here
        return rest
    except (AttributeError, KeyError, OSError, SyntaxError, TypeError, ValueError) as err:
        sys.exit(f"error: {_config_error(err, argv)}")


def _config_error(err: BaseException, argv: list[str]) -> str:
    """One line naming the flag at fault, from the exception chain ml_collections raises."""
    chain = []  # outermost first
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    texts = [str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) for e in chain]
    config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
    if isinstance(chain[-1], KeyError):  # an unknown field, maybe with ml_collections' guess
        name = texts[-1]
        override = next(
            (a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
             name in a.split("=", 1)[0].split(".")),
            f"--config.{name}",
        )  # fmt: skip
        guess = next((m for t in texts if (m := re.search(r'Did you mean "(\w+)"', t))), None)
        hint = ""
        if guess:
            parts = override.split(".")
            hint = "; did you mean " + ".".join(guess[1] if p == name else p for p in parts) + "?"
        return f"{override}: no such config field ({name!r} is not in {config_arg[9:]}){hint}"
    last = [line.strip() for line in texts[-1].splitlines() if line.strip()]
    message = last[-1] if last else type(chain[-1]).__name__
    if isinstance(chain[-1], SyntaxError):
        message = f"{type(chain[-1]).__name__}: {chain[-1]}"
    if isinstance(chain[0], OSError):  # the config file did not load
        return f"{config_arg}: cannot load the config file: {message}"
    return f"{config_arg}: {message}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines on stderr; library INFO chatter (orbax, grain) only with --verbosity=0.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:  # before anything touches a device
        distributed.initialize_from_flags()
    except ValueError as err:
        sys.exit(f"error: {err}")
    prefix = distributed.log_prefix()  # '[process i] ' when there are several
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log = logging.getLogger("dsv3_jax")
    log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    log.addHandler(handler)
    log.propagate = False
    log.info("config:\n%s", _CONFIG.value)
    try:
        trainer.train(_CONFIG.value, _WORKDIR.value)
    except (trainer.RunConfigError, trainer.NonFiniteError, distributed.PeerFailure) as err:
        sys.exit(f"{prefix}error: {err}")
    except distributed.PeerLost:  # logged; skip JAX's exit barrier, which waits for the lost one
        sys.stderr.flush()
        os._exit(1)
    except checkpoint.DamagedCheckpointError as err:
        hint = f"; delete {err.path} to resume from step {err.earlier_steps[-1]}"
        sys.exit(f"{prefix}error: {err}{hint if err.earlier_steps else ''}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
