"""Orbax checkpoints of a training run: model state, optimizer state, data iterator, metadata.

Layout: ``<workdir>/checkpoints/<step>/{model,opt,data,meta}``. ``meta`` (JSON) holds the model
config and, for compact-vocabulary runs, the original token id of each model id, so a checkpoint
alone is enough to sample from it. Orbax writes each step to a temporary folder and renames it
when complete, so a killed run never leaves a step that looks complete.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dsv3_jax import converted, fp8
from dsv3_jax.config import ModelConfig, dtype_name
from dsv3_jax.layers import fp8_scale_paths
from dsv3_jax.model import DeepseekV3, abstract_model, with_rules


class DamagedCheckpointError(ValueError):
    """A kept checkpoint step whose files cannot be read (damaged, truncated or missing).

    Attributes: step (int), path (the step folder), earlier_steps (kept steps before it, sorted).
    """

    def __init__(self, step: int, path: str, kept: list[int], cause: BaseException):
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # the innermost error says what failed
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        self.step, self.path = step, path
        self.earlier_steps = sorted(s for s in kept if s < step)
        super().__init__(
            f"checkpoint step {step} at {path} cannot be read, its files are damaged or "
            f"incomplete ({type(cause).__name__}: {reason}); kept steps: {sorted(kept)}"
        )


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def make_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={
            "model": ocp.StandardCheckpointHandler(),
            "opt": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def save(manager, step: int, model_state: nnx.State, opt_state, data_iter, meta: dict) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            opt=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def _ignore_reads_after_a_failed_restore() -> None:
    """Filters one known report out of ``sys.unraisablehook`` (installed once per process).

    When one array of a restore cannot be read, orbax closes its event loop while TensorStore
    reads of the other arrays are still in flight; each of them, on completion, reports
    ``RuntimeError('Event loop is closed')`` from a C++ callback (no object) through the
    unraisable hook: dozens of bare tracebacks, before and after the error is raised, seconds
    later; and orbax's own coroutines left un-awaited report their failure when collected.
    Exactly those are dropped; every other report goes to the previous hook.
    """
    if not _DAMAGED:  # first call: the asyncio filter too (see _OrbaxLeftovers)
        logging.getLogger("asyncio").addFilter(_OrbaxLeftovers())
        _DAMAGED.add("")  # marks the filters as installed; matches no message
    previous = sys.unraisablehook
    if getattr(previous, "dsv3_filter", False):
        return

    def hook(report):
        err, obj = report.exc_value, report.object
        if obj is None and type(err) is RuntimeError and str(err) == _LOOP_CLOSED:
            return
        code = getattr(obj, "cr_code", None)  # a coroutine being finalised
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(report)

    hook.dsv3_filter = True
    sys.unraisablehook = hook


_LOOP_CLOSED = "Event loop is closed"
_DAMAGED: set[str] = set()  # step folders a restore found damaged (already reported)


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax tasks that failed on a step
    folder already reported as damaged (a DamagedCheckpointError names it); keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "never retrieved" not in str(record.msg):
            return True
        text = str(exc)
        return not any(folder and folder in text for folder in _DAMAGED)


def _restore(manager, step: int, **items):
    """``manager.restore`` of ``items``; unreadable files raise DamagedCheckpointError."""
    _ignore_reads_after_a_failed_restore()
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except MemoryError:
        raise
    except Exception as err:  # orbax/TensorStore raise bare Exception with a spec dump
        folder = os.path.join(os.fspath(manager.directory), str(step))
        _DAMAGED.add(folder)
        damaged = DamagedCheckpointError(step, folder, list(manager.all_steps()), err)
    raise damaged  # outside the except: no chained TensorStore dump


def restore_targets(tree: Any) -> Any:
    """Orbax restore targets for a tree of arrays: each ``jax.Array`` becomes a
    ``jax.ShapeDtypeStruct`` of its shape, dtype and sharding (a model placed on a mesh restores
    onto that mesh, shard by shard); other leaves stay as they are."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )


def restore_training(manager, step: int, model_state: nnx.State, opt_state, data_iter):
    """Restores (model_state, opt_state) in place of the given templates; the iterator in place.

    Each array is restored with its template's shape, dtype and sharding (:func:`restore_targets`):
    templates placed on a mesh (any shape, not necessarily the one saved from) get arrays on that
    mesh, each device reading only its shards; single-device templates get single-device arrays.

    Raises:
      DamagedCheckpointError: the step's files cannot be read.
    """
    restored = _restore(
        manager,
        step,
        model=ocp.args.StandardRestore(restore_targets(model_state)),
        opt=ocp.args.StandardRestore(restore_targets(opt_state)),
        data=grain.checkpoint.CheckpointRestore(data_iter),
    )
    return restored["model"], restored["opt"]


def restore_meta(manager, step: int) -> dict:
    """The step's metadata. Raises DamagedCheckpointError if it cannot be read."""
    return _restore(manager, step, meta=ocp.args.JsonRestore())["meta"]


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if :func:`load_checkpoint` reads ``path``: a training workdir (``checkpoints/``), a
    ``checkpoints`` folder (``<step>/`` folders), one step folder, or a converted HF folder.

    A training workdir holds a config.json too, so callers telling checkpoints from HF folders ask
    this first.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        return False
    if converted.is_converted(path) or os.path.isdir(os.path.join(path, "checkpoints")):
        return True
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "model")):
        return True
    return any(d.isdigit() and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    fp8: bool = False,
    **config_overrides,
) -> tuple[DeepseekV3, dict]:
    """Loads a model from a training checkpoint or a ``convert.py hf_to_orbax`` folder.

    Args:
      path: a workdir (its ``checkpoints/`` is used), a ``checkpoints`` folder, one step folder
        ``checkpoints/<step>``, or a converted HF checkpoint (``convert.py hf_to_orbax`` output).
      step: the step to load (default: the latest, or the step folder's; a converted folder is
        step 0).
      dtype: parameter and computation dtype (e.g. ``jnp.float32``; default: as saved). The router
        and the correction bias stay float32; FP8 weights kept by ``--keep_fp8`` are dequantized
        (unless ``fp8``).
      mesh: None: every array on the default device. A mesh (``sharding.make_mesh``, of any
        shape: not necessarily the one the checkpoint was saved from): orbax restores each
        parameter and correction bias straight into the NamedSharding the rules give it, each
        device reading only its shards.
      rules: a sharding rules table (see ``sharding.DEFAULT_RULES``), kept as
        ``model.config.sharding_rules``. Default: the ``sharding_rules`` override, else the
        table saved in the checkpoint's config, else the default.
      fp8: FP8 inference: the model is built with ``fp8_weights=True`` (and ``fp8_training``
        off: a run trained in FP8 serves the same way; every projection a
        float8_e4m3fn kernel with float32 ``*_scale_inv`` in 128 x 128 blocks, run as an FP8
        GEMM; embedding, head, router and norms in ``dtype``). FP8 kernels of a ``--keep_fp8``
        folder keep their bytes and scales (never a float copy of them). Kernels stored in float
        (a training checkpoint, a folder converted without ``--keep_fp8``, MTP's eh_proj) are
        quantized on load: ``fp8.quantize_np`` (converted folders, on the host, one matrix at a
        time) or ``fp8.quantize`` (training checkpoints: restored in float, then quantized
        parameter by parameter on their devices), scale = amax / 448 per block. Works with
        ``mesh`` (see ``converted.load_converted``).
      config_overrides: ModelConfig implementation fields (e.g. ``remat=True``).

    Returns:
      (model, meta) where meta holds ``model_config``, ``vocab`` (original ids or None), ``step``.
      With a mesh the model is placed on it and runs sharded when called.

    Raises:
      FileNotFoundError: no checkpoint there, or not of that step (the kept steps are listed).
      DamagedCheckpointError: (a ValueError) the step's files cannot be read; the message names
        the step folder, the first line of the underlying error and the kept steps.
      ValueError: a bad step, a bad rules table, ``rules`` and a different ``sharding_rules``.
    """
    if step is not None and (not isinstance(step, (int, np.integer)) or isinstance(step, bool)):
        raise ValueError(f"step must be an int or None, got {step!r}")
    config_overrides = with_rules(config_overrides, rules)
    if converted.is_converted(path):
        if step not in (None, 0):
            raise ValueError(
                f"{path} is a converted HF checkpoint (step 0), step={step} was asked for"
            )
        return converted.load_converted(path, dtype, mesh=mesh, fp8=fp8, **config_overrides)
    if dtype is not None:
        name = dtype_name(dtype)
        config_overrides = {"dtype": name, "param_dtype": name, **config_overrides}
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "model")):
        # A step folder (checkpoints/<step>): load that step.
        if step is not None and step != int(os.path.basename(path)):
            raise ValueError(
                f"{path} is step {os.path.basename(path)}, but step={step} was asked for"
            )
        path, step = os.path.dirname(path), int(os.path.basename(path))
    ckpt = checkpoint_dir(path) if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(ckpt) or not any(d.isdigit() for d in os.listdir(ckpt)):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = (
                "; it looks like an HF checkpoint: convert it with `python convert.py hf_to_orbax` "
                "or load it with dsv3_jax.load_hf_checkpoint"
            )
        raise FileNotFoundError(
            f"no checkpoints at {path} (expected a training workdir with checkpoints/<step>/, "
            f"such a checkpoints folder, or a convert.py hf_to_orbax folder){hint}"
        )
    manager = ocp.CheckpointManager(
        ckpt,
        item_handlers={
            "model": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )
    kept = list(manager.all_steps())
    step = manager.latest_step() if step is None else step
    if step is None or step not in kept:
        raise FileNotFoundError(
            f"no complete checkpoint of step {step} in {ckpt}; kept steps: {sorted(kept)}"
        )
    try:
        meta = restore_meta(manager, step)
        config = ModelConfig.from_dict({**meta["model_config"], **config_overrides})
        if fp8:
            config = config.replace(fp8_weights=True, fp8_training=False)
        # Targets: ShapeDtypeStructs with their shardings; orbax casts to the dtype. Without a
        # mesh, one device: orbax would otherwise restore onto the mesh the arrays were saved on.
        # A training checkpoint holds float weights: the FP8 model's are quantized from them.
        mtp = meta.get("mtp", True)
        graphdef, target = abstract_model(config.replace(fp8_weights=False), mtp, mesh)
        if mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), target
            )
        restored = _restore(manager, step, model=ocp.args.StandardRestore(target))["model"]
    finally:
        manager.close()
    meta = dict(meta, step=step)
    if config.fp8_weights:
        return _quantized(restored, config, mtp, mesh), meta
    return nnx.merge(graphdef, restored), meta


def _quantized(state: nnx.State, config: ModelConfig, mtp: bool, mesh) -> DeepseekV3:
    """The FP8 model (``config.fp8_weights``) from a float model state: each kernel quantized
    by ``fp8.quantize`` in 128 x 128 blocks on its devices, into the FP8 model's shardings (the
    float kernel is dropped once quantized)."""
    graphdef, abstract = abstract_model(config, mtp, mesh)
    flat = dict(nnx.to_flat_state(abstract))
    floats = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    del state
    values = {}
    for p, s in fp8_scale_paths(flat).items():
        targets = (flat[p].get_value(), flat[s].get_value())
        out = None if mesh is None else tuple(t.sharding for t in targets)
        quantize = jax.jit(fp8.quantize, static_argnums=1, out_shardings=out)
        values[p], values[s] = quantize(floats.pop(p), fp8.WEIGHT_BLOCK)
    values.update(floats)
    return nnx.merge(
        graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat.items()])
    )


def meta_for(config: ModelConfig, vocab_ids: Any, mtp: bool, extra: dict | None = None) -> dict:
    return {
        "model_config": config.to_dict(),
        "vocab": None if vocab_ids is None else [int(i) for i in vocab_ids],
        "mtp": bool(mtp),
        **(extra or {}),
    }
