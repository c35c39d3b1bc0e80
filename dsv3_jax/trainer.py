"""The training run behind ``train.py``: data, model, optimizer, resume, loop, logs, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import signal
import tempfile
import time

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter

from dsv3_jax import checkpoint, data, distributed, sharding, train_lib
from dsv3_jax.config import IMPLEMENTATION_FIELDS, ModelConfig
from dsv3_jax.model import DeepseekV3, init_model

log = logging.getLogger("dsv3_jax")


def prepare_data(cfg) -> tuple[np.ndarray, np.ndarray, data.CompactVocab | None]:
    """Token streams (in model ids) and the compact vocabulary (None for the full vocabulary)."""
    data.build_token_cache(cfg.data.cache_dir, verbose=jax.process_index() == 0)
    train_tokens = np.asarray(data.load_tokens(cfg.data.cache_dir, "train"))
    val_tokens = np.asarray(data.load_tokens(cfg.data.cache_dir, "val"))
    if not cfg.data.compact_vocab:
        return train_tokens.astype(np.int32), val_tokens.astype(np.int32), None
    vocab = data.CompactVocab.from_tokens(train_tokens, val_tokens)
    return vocab.to_compact(train_tokens), vocab.to_compact(val_tokens), vocab


def model_config(cfg, vocab: data.CompactVocab | None) -> ModelConfig:
    fields = dict(cfg.model)  # rope_scaling may be a ConfigDict: ModelConfig reads that form
    if vocab is not None:
        fields.update(vocab_size=vocab.size, bos_token_id=vocab.bos, eos_token_id=vocab.eos)
    return ModelConfig.from_dict(fields)


def init_from(
    cfg, vocab: data.CompactVocab | None, train_tokens, val_tokens, mesh: Mesh | None = None
) -> DeepseekV3:
    """The model to fine-tune: weights and architecture from ``cfg.init_from``.

    ``cfg.init_from`` is, in the order it is recognised: a training workdir, its ``checkpoints``
    folder or one ``checkpoints/<step>`` folder; a ``convert.py hf_to_orbax`` folder (original
    tokenizer ids); an HF directory (config.json + safetensors). The implementation knobs
    (``IMPLEMENTATION_FIELDS``: dtypes, remat, moe_impl, attention choices) come from
    ``cfg.model``; its architecture fields are ignored (a warning lists those that differ from
    the checkpoint's).

    With ``mesh`` the weights are read straight onto it (each process reads only its shards).

    Raises:
      RunConfigError: no checkpoint there; its vocabulary is not the data's (e.g. a converted
        checkpoint with ``data.compact_vocab=True``); data ids outside its vocabulary; seq_len
        beyond its max_position_embeddings.
    """
    from dsv3_jax.hf_io import CheckpointError, load_hf_checkpoint  # noqa: PLC0415

    path = cfg.init_from
    knobs = {
        k: cfg.model[k]
        for k in IMPLEMENTATION_FIELDS
        if k in cfg.model and k not in ("dtype", "param_dtype")
    }
    dtype = cfg.model.get("param_dtype", "float32")
    try:
        # A training workdir also holds a config.json: look for checkpoints before HF files.
        if checkpoint.is_checkpoint(path) or not os.path.isfile(os.path.join(path, "config.json")):
            model, meta = checkpoint.load_checkpoint(path, dtype=dtype, mesh=mesh, **knobs)
            saved_vocab = meta.get("vocab")
        else:
            model, saved_vocab = load_hf_checkpoint(path, dtype, mesh=mesh, **knobs), None
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        raise RunConfigError(f"config.init_from={path!r}: {err}") from err
    mcfg = model.config
    data_vocab = None if vocab is None else [int(i) for i in vocab.original_ids]
    if (saved_vocab or None) != data_vocab:
        ours = "the full tokenizer vocabulary" if data_vocab is None else "a compact vocabulary"
        theirs = (
            f"the full tokenizer vocabulary ({mcfg.vocab_size} ids)"
            if not saved_vocab
            else f"a compact vocabulary of {len(saved_vocab)} ids"
        )
        fix = (
            "set --config.data.compact_vocab=False"
            if not saved_vocab
            else "use the data and compact_vocab setting it was trained with"
        )
        raise RunConfigError(
            f"config.init_from={path!r} uses {theirs} but the data uses {ours}; {fix}"
        )
    top = int(max(train_tokens.max(), val_tokens.max()))
    if top >= mcfg.vocab_size:
        raise RunConfigError(
            f"the data holds token id {top}, outside config.init_from's vocab_size {mcfg.vocab_size}"
        )
    if cfg.data.seq_len > mcfg.max_position_embeddings:
        raise RunConfigError(
            f"config.data.seq_len ({cfg.data.seq_len}) exceeds config.init_from's "
            f"max_position_embeddings ({mcfg.max_position_embeddings})"
        )
    ignored = {
        k: (v, getattr(mcfg, k))
        for k, v in cfg.model.items()
        if k not in IMPLEMENTATION_FIELDS
        and k != "vocab_size"
        and hasattr(mcfg, k)
        and _plain(v) != _plain(getattr(mcfg, k))
    }
    if ignored:
        log.warning(
            "init_from %s: the checkpoint's architecture is used; config.model differs in "
            "(config -> checkpoint): %s",
            path,
            ignored,
        )
    log.info("initialised from %s (%s)", path, "with MTP" if model.num_mtp else "no MTP")
    return model


def _plain(v):
    """Config values in comparable form (ConfigDict / dataclass -> dict)."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return v


def evaluate(graphdef, params, biases, batches, feeder: BatchFeeder | None = None) -> float:
    """Held-out loss in nats/token over every masked target of ``batches``.

    ``batches``: (inputs [b, s + 1], mask [b, s]) pairs, whole (global) batches; ``feeder``
    places this process's rows of each on the mesh (default: one device).
    """
    total, count = 0.0, 0.0
    for inputs, mask in batches:
        if feeder is not None:
            inputs, mask = feeder.put(feeder.local(inputs)), feeder.put(feeder.local(mask))
        s, n = train_lib.eval_step(graphdef, params, biases, inputs, mask)
        total, count = total + float(s), count + float(n)
    return total / count


class BatchFeeder:
    """Global batches of ``rows`` rows on a mesh, split over its batch axes (data, fsdp, expert).

    Each process feeds the rows its devices hold: ``shard`` = ShardOptions(k, n) means rows
    [k * rows / n, (k + 1) * rows / n) of every global batch (n = 1 in a one-process run).
    """

    def __init__(self, mesh: Mesh, rows: int):
        self.rows = rows
        self.sharding = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
        spans = {
            (idx[0].start or 0, rows if idx[0].stop is None else idx[0].stop)
            for idx in self.sharding.addressable_devices_indices_map((rows, 1)).values()
        }
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        covered = set().union(*(range(a, b) for a, b in spans))
        if covered != set(range(lo, hi)) or rows % (hi - lo) or lo % (hi - lo):
            raise RunConfigError(
                f"process {jax.process_index()} would feed rows {sorted(spans)} of each batch of "
                f"{rows}: not one aligned block; use a mesh whose batch axes follow the processes"
            )
        self.shard = grain.sharding.ShardOptions(lo // (hi - lo), rows // (hi - lo))
        self.lo, self.hi = lo, hi

    def local(self, batch: np.ndarray) -> np.ndarray:
        """This process's rows of a whole batch."""
        return batch[self.lo : self.hi]

    def put(self, local: np.ndarray) -> jax.Array:
        """The global batch [rows, ...] made of every process's ``local`` rows."""
        local = np.asarray(local)
        return jax.make_array_from_process_local_data(
            self.sharding, local, (self.rows, *local.shape[1:])
        )


class RunConfigError(ValueError):
    """A run config or workdir that cannot work; raised before any data or model work."""


class NonFiniteError(RuntimeError):
    """The loss, gradient norm or training state became non-finite; nothing of it was saved."""


def _check_folder(path: str, name: str, *, may_be_read_only=None) -> None:
    """Raises RunConfigError unless ``path`` is a folder this run can write in, or can create.

    Writability is tested by creating a file (``os.access`` says yes to root on a read-only
    mount). ``may_be_read_only(path)`` may accept an existing folder that needs no writes.
    """
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "exists and is not a directory" if probe == path else f"is under a file, {probe}"
        raise RunConfigError(f"{name} {path} {what}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        if probe == path and may_be_read_only is not None and may_be_read_only(path):
            return
        where = "" if probe == path else f" (it would be created in {probe})"
        raise RunConfigError(f"{name} {path} is not writable{where}: {err.strerror}") from err


def check_run_config(cfg, workdir: str) -> None:
    """Raises RunConfigError naming the field for settings that cannot work."""
    for section in ("model", "data", "train"):
        if section not in cfg:
            raise RunConfigError(
                f"the config has no '{section}' section (train.py needs model, data and train; "
                "configs/deepseek_v3_671b.py describes a model only)"
            )
    if not (workdir or "").strip():
        raise RunConfigError("--workdir is empty; give the run's folder")
    _check_folder(workdir, "--workdir")
    t, d = cfg.train, cfg.data
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "data.seq_len": d.seq_len,
                "data.eval_batch_size": d.eval_batch_size, "train.log_every": t.log_every,
                "train.eval_every": t.eval_every, "train.save_every": t.save_every, "train.keep": t.keep,
                "train.lr": t.lr, "train.clip": t.clip}  # fmt: skip
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise RunConfigError(f"config.{name} must be a finite number > 0, got {value!r}")
    non_negative = {"train.weight_decay": t.weight_decay, "train.eps": t.eps,
                    "train.mtp_lambda": t.mtp_lambda, "train.balance_alpha": t.balance_alpha,
                    "train.bias_gamma": t.bias_gamma,
                    "train.mtp_lambda_final": t.get("mtp_lambda_final", 0.1),
                    "train.max_consecutive_skips": t.get("max_consecutive_skips", 0)}  # fmt: skip
    for name, value in non_negative.items():
        if not (value >= 0 and math.isfinite(value)):
            raise RunConfigError(f"config.{name} must be a finite number >= 0, got {value!r}")
    for name in ("mtp_lambda_final_fraction", "bias_gamma_final_fraction"):
        if not 0 <= t.get(name, 0.0) <= 1:
            raise RunConfigError(f"config.train.{name} must be in [0, 1], got {t[name]!r}")
    ints = {"microbatches": 1, "batch_size_ramp_start": 0, "batch_size_ramp_steps": 0,
            "batch_size_ramp_stages": 1}  # fmt: skip
    for name, least in ints.items():
        value = t.get(name, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise RunConfigError(f"config.train.{name} must be an int >= {least}, got {value!r}")
    if t.batch_size % t.get("microbatches", 1):
        raise RunConfigError(
            f"config.train.batch_size={t.batch_size} must be a multiple of "
            f"config.train.microbatches={t.microbatches}"
        )
    if t.get("batch_size_ramp_start", 0) > t.batch_size:
        raise RunConfigError(
            f"config.train.batch_size_ramp_start={t.batch_size_ramp_start} must be <= "
            f"config.train.batch_size={t.batch_size} (the size the ramp ends at)"
        )
    if t.get("batch_size_ramp_start", 0) and t.get("batch_size_ramp_steps", 0) > t.steps:
        raise RunConfigError(
            f"config.train.batch_size_ramp_steps={t.batch_size_ramp_steps} must be <= "
            f"config.train.steps={t.steps}: the ramp would never reach "
            f"config.train.batch_size={t.batch_size}"
        )
    for name in ("b1", "b2"):
        if not 0 <= t[name] < 1:
            raise RunConfigError(f"config.train.{name} must be in [0, 1), got {t[name]!r}")
    if not 0 <= t.seed < 2**32:
        raise RunConfigError(f"config.train.seed must be in [0, 2**32), got {t.seed!r}")
    if not 0 <= t.min_lr <= t.lr:
        raise RunConfigError(f"config.train.min_lr must be in [0, lr={t.lr}], got {t.min_lr!r}")
    if t.warmup_steps < 0 or not 0 <= t.decay_start_fraction <= 1:
        raise RunConfigError(
            f"config.train.warmup_steps must be >= 0 and decay_start_fraction in [0, 1], got "
            f"{t.warmup_steps!r} and {t.decay_start_fraction!r}"
        )
    if d.seq_len > cfg.model.max_position_embeddings:
        raise RunConfigError(
            f"config.data.seq_len ({d.seq_len}) exceeds config.model.max_position_embeddings "
            f"({cfg.model.max_position_embeddings})"
        )
    # A read-only token cache is fine if it is complete (nothing to write).
    cache_ok = data.token_cache_is_current
    _check_folder(d.cache_dir, "config.data.cache_dir", may_be_read_only=cache_ok)
    if cfg.model.get("fp8_weights"):
        raise RunConfigError(
            "config.model.fp8_weights holds frozen FP8 weights for inference; to train in FP8 set "
            "config.model.fp8_training=True (FP8 GEMMs over float32 master weights)"
        )
    if cfg.get("init_from"):
        if not os.path.exists(cfg.init_from):
            raise RunConfigError(f"config.init_from {cfg.init_from} does not exist")
    else:  # with init_from the checkpoint's architecture is used, not config.model's
        _model_config(cfg, None)


def _model_config(cfg, vocab) -> ModelConfig:
    try:
        return model_config(cfg, vocab)
    except (TypeError, ValueError) as err:
        raise RunConfigError(f"config.model: {err}") from err


def make_mesh(cfg) -> Mesh:
    """The mesh of ``config.mesh`` (all devices on data without that section)."""
    axes = dict(cfg.get("mesh") or {})
    try:
        return sharding.make_mesh(axes)
    except ValueError as err:
        raise RunConfigError(f"config.mesh: {err}") from err


def check_batches(cfg, mesh: Mesh) -> None:
    """Raises RunConfigError unless the batch sizes split evenly over the mesh's batch axes
    (train batches: each of their ``train.microbatches`` micro-batches, ramp sizes included)."""
    ways = sharding.batch_shards(mesh)
    micro = cfg.train.get("microbatches", 1)
    for name, rows, unit in (
        ("train.batch_size", cfg.train.batch_size, ways * micro),
        ("train.batch_size_ramp_start", cfg.train.get("batch_size_ramp_start", 0), ways * micro),
        ("data.eval_batch_size", cfg.data.eval_batch_size, ways),
    ):
        if rows % unit:
            axes = " x ".join(f"{a}={mesh.shape[a]}" for a in sharding.BATCH_AXES)
            per = f" x train.microbatches={micro}" if unit != ways else ""
            raise RunConfigError(
                f"config.{name}={rows} must be a multiple of {unit}, the devices the batch is "
                f"split over ({axes} of config.mesh){per}"
            )


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The run's step schedules (V3 section 4.2), functions of the 0-based step: the batch-size
    ramp (``ramp``: train_lib.batch_size_stages), the MTP weight lambda and the bias update speed
    gamma (train_lib.final_stretch_value), beside the learning rate of ``lr``."""

    ramp: tuple[tuple[int, int], ...]
    microbatches: int
    lr: object  # optax schedule of the optimizer step count
    mtp_lambda: tuple[float, float, float]  # value, final value, final fraction
    balance_alpha: float
    bias_gamma: tuple[float, float]  # value, final fraction (then 0)
    steps: int

    @classmethod
    def of(cls, t, mesh: Mesh, lr) -> Schedules:
        micro = t.get("microbatches", 1)
        ramp = train_lib.batch_size_stages(
            t.batch_size,
            t.get("batch_size_ramp_start", 0),
            t.get("batch_size_ramp_steps", 0),
            t.get("batch_size_ramp_stages", 4),
            unit=micro * sharding.batch_shards(mesh),
        )
        return cls(
            ramp, micro, lr,
            (t.mtp_lambda, t.get("mtp_lambda_final", 0.1), t.get("mtp_lambda_final_fraction", 0.0)),
            t.balance_alpha, (t.bias_gamma, t.get("bias_gamma_final_fraction", 0.0)), t.steps,
        )  # fmt: skip

    def batch_size(self, step: int) -> int:
        return train_lib.batch_size_at(self.ramp, step)

    def weights(self, step: int) -> train_lib.LossWeights:
        """The loss weights of 0-based step ``step`` (traced by train_step: no recompiles)."""
        lam = train_lib.final_stretch_value(step, *self.mtp_lambda, self.steps)
        gamma = train_lib.final_stretch_value(step, self.bias_gamma[0], 0.0, self.bias_gamma[1],
                                              self.steps)  # fmt: skip
        return train_lib.LossWeights(lam, self.balance_alpha, gamma)

    def describe(self) -> str:
        lam, lam_final, lam_frac = self.mtp_lambda
        parts = [
            f"batch size {' -> '.join(f'{b} (step {s})' for s, b in self.ramp)}",
            f"{self.microbatches} micro-batch(es) per step",
            f"mtp_lambda {lam}" + (f" then {lam_final} for the last {lam_frac:.1%} of steps"
                                   if lam_frac else ""),
            f"bias_gamma {self.bias_gamma[0]}" + (f" then 0 for the last {self.bias_gamma[1]:.1%}"
                                                  " of steps" if self.bias_gamma[1] else ""),
        ]  # fmt: skip
        return "schedules: " + "; ".join(parts)


def train(cfg, workdir: str) -> dict:
    """Trains (or resumes) and returns the final metrics (including ``val_loss``).

    The model, optimizer state and batches live on the mesh of ``config.mesh`` (every device of
    every process); with several processes (``distributed.initialize`` first) each one reads its
    own rows of every global batch, and the global batches are the one-process run's.

    A step whose loss or gradient norm is not finite stops the run (``NonFiniteError``) or, with
    ``train.skip_nonfinite``, is skipped (nothing changes) unless more than
    ``train.max_consecutive_skips`` come in a row. No checkpoint with a non-finite value is saved.

    Raises:
      RunConfigError: a setting that cannot work (a mesh that is not the device count, batch
        sizes it does not split), processes started with different configs, a workdir holding a
        run of another model or a non-finite latest checkpoint, data ids outside
        ``model.vocab_size``. A workdir that did not exist is created only after every check but
        the last two has passed.
      distributed.PeerFailure: another process stopped with an error while preparing the run.
      NonFiniteError: see above; the checkpoints saved before stay as they are.
    """
    try:
        distributed.check_same("config", {"config": cfg.to_dict(), "workdir": workdir})
    except ValueError as err:
        raise RunConfigError(str(err)) from None
    failure = prepared = None
    try:  # every process checks, reads and builds; then they agree (no one waits for a failed one)
        prepared = _prepare(cfg, workdir)
    except Exception as err:  # noqa: BLE001 (re-raised by agree)
        failure = err
    distributed.agree(failure, "checking the config and preparing the data and model")
    mesh, model, mcfg, vocab, train_tokens, val_tokens = prepared
    t = cfg.train
    skip_nonfinite = bool(t.get("skip_nonfinite", False))
    max_skips = int(t.get("max_consecutive_skips", 0)) if skip_nonfinite else 0
    with jax.set_mesh(mesh):
        sharding.shard_model(model, mesh, mcfg.sharding_rules)  # keeps a saved custom table
        graphdef, params, biases = train_lib.split_model(model)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        log.info("model: %s parameters", f"{n_params:,}")
        log.info("%s", sharding.describe(mesh))
        for line in sharding.summary_groups(nnx.state(model), mesh, mcfg.sharding_rules):
            log.info("  %s", line)

        decay_start = int(t.steps * t.decay_start_fraction)
        schedule = train_lib.lr_schedule(t.lr, t.min_lr, t.warmup_steps, decay_start, t.steps)
        tx = train_lib.make_optimizer(
            schedule,
            b1=t.b1,
            b2=t.b2,
            eps=t.eps,
            weight_decay=t.weight_decay,
            clip=t.clip,
            mask=train_lib.decay_mask(params, t.decay_embeddings),
            moment_dtype="bfloat16" if mcfg.fp8_training else None,
        )
        opt_state = train_lib.init_opt_state(tx, params, model.config.sharding_rules)
        schedules = Schedules.of(t, mesh, schedule)
        log.info(
            "%s; lr: warmup %d steps to %g, constant to step %d, cosine to %g at step %d",
            schedules.describe(), t.warmup_steps, t.lr, decay_start, t.min_lr, t.steps,
        )  # fmt: skip
        feed = BatchFeeder(mesh, t.batch_size)
        ramp = schedules.ramp if len(schedules.ramp) > 1 else ()
        dataset = data.make_train_dataset(
            train_tokens, cfg.data.seq_len, t.batch_size, t.seed, shard=feed.shard, ramp=ramp
        )
        data_iter = iter(dataset)
        val = data.val_batches(
            val_tokens, cfg.data.seq_len, cfg.data.eval_batch_size, pad_id=mcfg.bos_token_id
        )
        val_feed = BatchFeeder(mesh, cfg.data.eval_batch_size)

        os.makedirs(workdir, exist_ok=True)  # only now: a run refused above leaves no folder
        manager = checkpoint.make_manager(workdir, t.keep)
        try:
            return _train_loop(
                cfg, workdir, manager, model, mcfg, vocab, schedule, tx, opt_state, schedules,
                data_iter, feed, val, val_feed, skip_nonfinite, max_skips,
            )  # fmt: skip
        except jax.errors.JaxRuntimeError as err:
            lost = distributed.lost_peer(err)
            if lost is None:
                raise
            # Logged now: closing the checkpoints below may wait for the lost process.
            log.error("error: %s", lost)
            raise lost from None
        finally:  # a stopped run still completes the (good) checkpoint being written
            manager.wait_until_finished()
            manager.close()


def _prepare(cfg, workdir: str):
    """Checks the config, makes the mesh, reads the data, builds (or loads) the model.

    Returns:
      (mesh, model (built on one device; loaded onto the mesh for init_from), its ModelConfig,
      vocab, train tokens, val tokens).
    """
    check_run_config(cfg, workdir)
    mesh = make_mesh(cfg)
    check_batches(cfg, mesh)
    log.info(
        "jax %s on %s, devices %s, python %s",
        jax.__version__,
        jax.default_backend(),
        jax.devices(),
        platform.python_version(),
    )
    try:
        train_tokens, val_tokens, vocab = prepare_data(cfg)
    except OSError as err:
        raise RunConfigError(f"config.data.cache_dir {cfg.data.cache_dir}: {err}") from err
    if cfg.get("init_from"):
        model = init_from(cfg, vocab, train_tokens, val_tokens, mesh)
        mcfg = model.config
    else:
        mcfg = _model_config(cfg, vocab)
        top = int(max(train_tokens.max(), val_tokens.max()))
        if top >= mcfg.vocab_size:
            raise RunConfigError(
                f"the data holds token id {top} but config.model.vocab_size is {mcfg.vocab_size}; "
                f"set it above {top} or set config.data.compact_vocab=True"
            )
        model = init_model(mcfg, cfg.train.seed, mesh=mesh)  # created in its shards
    log.info(
        "train tokens %d, val tokens %d, vocab %d",
        len(train_tokens),
        len(val_tokens),
        mcfg.vocab_size,
    )
    return mesh, model, mcfg, vocab, train_tokens, val_tokens


def _train_loop(
    cfg, workdir, manager, model, mcfg, vocab, schedule, tx, opt_state, schedules, data_iter, feed,
    val, val_feed, skip_nonfinite, max_skips,
) -> dict:  # fmt: skip
    t = cfg.train
    primary = jax.process_index() == 0  # writes the logs, config.json, metrics, TensorBoard
    run_config = {"data": cfg.data.to_dict(), "train": cfg.train.to_dict()}
    # The batch size of every step as this run resolves it (the ramp's sizes are rounded to
    # micro-batches x batch shards): a resumed run must see the same, or its data would shift.
    batch_sizes = [[int(first), int(rows)] for first, rows in schedules.ramp]
    meta = checkpoint.meta_for(
        mcfg,
        None if vocab is None else vocab.original_ids,
        model.num_mtp,
        {"run_config": run_config, "batch_sizes": batch_sizes},
    )
    graphdef, params, biases = train_lib.split_model(model)
    step = manager.latest_step() or 0
    if step:
        saved = checkpoint.restore_meta(manager, step)
        diff = {
            k: (saved["model_config"].get(k), v)
            for k, v in meta["model_config"].items()
            if saved["model_config"].get(k) != v and k not in IMPLEMENTATION_FIELDS
        }
        if diff or saved.get("vocab") != meta["vocab"]:
            raise RunConfigError(
                f"{workdir} holds a run of another model (saved vs now: {diff or 'vocabulary differs'}); "
                "use a new --workdir or the saved config"
            )
        _check_processes(workdir, step)
        _check_same_batches(saved, t, batch_sizes, workdir)
        model_state, opt_state = checkpoint.restore_training(
            manager, step, nnx.state(model), opt_state, data_iter
        )
        if not train_lib.all_finite((model_state, opt_state)):  # written by an older version
            ckpt = checkpoint.checkpoint_dir(workdir)
            earlier = [s for s in manager.all_steps() if s < step]
            fix = f"to resume from step {max(earlier)}" if earlier else "to start over"
            raise RunConfigError(
                f"the latest checkpoint, step {step} in {ckpt}, holds non-finite (NaN/inf) "
                f"values; delete {os.path.join(ckpt, str(step))} {fix}, or use a new --workdir"
            )
        nnx.update(model, model_state)
        graphdef, params, biases = train_lib.split_model(model)
        log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), step)
        changed = _changes(saved.get("run_config", {}), run_config)
        if changed:
            log.warning(
                "resuming with changed settings (saved -> now): %s%s",
                changed,
                "; the learning-rate schedule is rebuilt for the new train.steps"
                if "train.steps" in changed
                else "",
            )
    elif primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"model_config": mcfg.to_dict(), "run_config": cfg.to_dict()}, f, indent=1)

    writer = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10) if primary else _NoWriter()
    history = MetricsLog(workdir, step, schedule) if primary else None
    metrics, last = {}, time.time()
    start_step = last_step = step
    # Non-finite steps are counted on the device and read at the log/eval/save points, which
    # sync anyway: no extra host round trip per step.
    tracker, skipped = sharding.place(train_lib.new_nonfinite_tracker(), feed.sharding.mesh), 0
    feeds = {rows: BatchFeeder(feed.sharding.mesh, rows) for _, rows in schedules.ramp}
    if any(f.shard != feed.shard for f in feeds.values()):
        raise RunConfigError(
            "config.train.batch_size_ramp_start: this process would feed other rows of the ramp's "
            "batches than of the final ones; use a mesh whose batch axes follow the processes"
        )
    tokens_seen = last_tokens = 0
    # The first step of each later batch size compiles the step again: it is timed apart (a host
    # sync before and after it, a few times a run) and left out of tokens/s and the ETA, as the
    # run's first step is. paused = [steps, tokens, seconds] so left out.
    compiled, paused, logged_pause = {schedules.batch_size(step)}, [0, 0, 0.0], [0, 0, 0.0]
    while step < t.steps:
        rows, weights = schedules.batch_size(step), schedules.weights(step)
        batch = feeds[rows].put(next(data_iter))  # [b, s + 1] over the batch axes
        recompile = rows not in compiled
        if recompile:
            compiled.add(rows)
            jax.block_until_ready(params)
            began = time.time()
        params, biases, opt_state, metrics = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, batch,
            skip_nonfinite=skip_nonfinite, microbatches=schedules.microbatches,
        )  # fmt: skip
        step += 1
        tokens_seen += rows * cfg.data.seq_len
        if recompile:
            jax.block_until_ready(metrics["loss"])
            paused = [paused[0] + 1, paused[1] + rows * cfg.data.seq_len,
                      paused[2] + time.time() - began]  # fmt: skip
        tracker = train_lib.track_nonfinite(tracker, metrics, step, max_skips)
        del metrics["finite"]
        metrics.update(
            batch_size=rows, mtp_lambda=weights.mtp_lambda, bias_gamma=weights.bias_gamma
        )  # logged with the lr at the log points
        if history is not None:
            history.add(step, metrics)
        log_now = step % t.log_every == 0 or step == t.steps or step == start_step + 1
        eval_now = step % t.eval_every == 0 or step == t.steps
        save_now = step % t.save_every == 0 or step == t.steps
        if log_now:  # tokens and seconds since the last log, without a new size's compile
            new_pause = [a - b for a, b in zip(paused, logged_pause, strict=True)]
            tokens_since = tokens_seen - last_tokens - new_pause[1]
            last_tokens, logged_pause = tokens_seen, list(paused)
        if log_now or eval_now or save_now:
            skipped = _check_nonfinite(tracker, skipped, step, t, manager, writer)
        if log_now:
            metrics = {
                k: float(v) for k, v in jax.device_get(metrics).items() if k not in LOAD_KEYS
            }
            now = time.time()
            steps_done, last_step = step - last_step - new_pause[0], step
            first = step == start_step + 1
            if first:  # the first step's time is mostly compilation: no throughput, no ETA
                clock = (step, now)
            elif steps_done > 0:
                metrics["tokens_per_s"] = tokens_since / max(now - last - new_pause[2], 1e-9)
            metrics["lr"] = float(schedule(step - 1))
            last = now
            parts = [f"step {step}", f"loss {metrics['loss']:.4f}", f"ce {metrics['ce']:.4f}"]
            if "mtp_ce" in metrics:
                parts.append(f"mtp {metrics['mtp_ce']:.4f}")
            parts += [f"lr {metrics['lr']:.2e}", f"grad_norm {metrics['grad_norm']:.3f}"]
            if "tokens_per_s" in metrics:
                parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
            parts.append(f"expert load max/mean {metrics['load_max_over_mean']:.2f}")
            if metrics["dropped"] or mcfg.moe_capacity_factor is not None:
                parts.append(f"dropped {metrics['dropped']:.0f} assignments")
            parts.append(_progress(step, t.steps, clock, now, paused))
            log.info(" | ".join(parts))
            for k, v in metrics.items():
                writer.add_scalar(f"train/{k}", v, step)
        if eval_now:
            metrics["val_loss"] = evaluate(graphdef, params, biases, val, val_feed)
            log.info("step %d | validation loss %.4f nats/token", step, metrics["val_loss"])
            writer.add_scalar("val/loss", metrics["val_loss"], step)
            last = time.time()
        if history is not None and (log_now or eval_now or save_now):
            history.flush(
                tokens_per_s=metrics.get("tokens_per_s") if log_now else None,
                val_loss=metrics["val_loss"] if eval_now else None,
            )
        if save_now:
            if not train_lib.all_finite((params, biases, opt_state)):
                writer.close()
                raise NonFiniteError(
                    f"step {step}: the model or optimizer state holds non-finite values (the loss "
                    f"and gradient norm were finite); not saving it; {_last_saved(manager)}"
                )
            state = nnx.state(nnx.merge(graphdef, params, biases))
            checkpoint.save(manager, step, state, opt_state, data_iter, meta)
            if os.environ.get("DSV3_TEST_KILL_IN_SAVE") == str(step):
                _kill_once_writing(manager, step)
    writer.close()
    metrics["step"] = step
    if skip_nonfinite:
        metrics["skipped_steps"] = skipped
    if step == start_step:  # nothing left to train: report the saved model, rewrite nothing
        metrics["val_loss"] = evaluate(graphdef, params, biases, val, val_feed)
        log.info(
            "already at step %d of %d | validation loss %.4f nats/token",
            step,
            t.steps,
            metrics["val_loss"],
        )
        return metrics
    if primary:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(_json_safe(metrics), f, indent=1, allow_nan=False)
    return metrics


LOAD_KEYS = ("main_load", "mtp_loads")  # train_step's array metrics: in metrics.jsonl only


class MetricsLog:
    """The run's per-step log ``<workdir>/metrics.jsonl`` (process 0 writes it).

    One JSON object a line, one line per optimizer step, in step order: ``step``; the train
    step's scalars ``loss``, ``ce``, ``mtp_ce`` (with MTP), ``balance``, ``dropped``,
    ``grad_norm``, ``load_max_over_mean``; ``lr`` (the step's learning rate); ``expert_load``
    [MoE layer][expert] and, with MTP, ``mtp_expert_load`` [depth][expert]: the step's routed
    assignments per expert over the global batch (integers); at log points ``tokens_per_s``
    (mean since the previous log point; not on a run's first step, mostly compilation); at
    evaluations ``val_loss``. Non-finite values are written as null.

    The step's device arrays are kept (no host sync) and written at the next log, eval or save
    point. A run resumed at step ``n`` first drops the lines after step ``n`` (a run stopped
    after its last checkpoint logged them) and any line cut short, so the file holds each step
    once.
    """

    def __init__(self, workdir: str, start_step: int, schedule):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.schedule = schedule
        self.pending: list[tuple[int, dict]] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            keep = [x for x in lines if _logged_step(x) <= start_step]
            if keep != lines:
                with open(self.path, "w") as f:
                    f.writelines(keep)

    def add(self, step: int, metrics: dict) -> None:
        """Keeps the step's train_step metrics (device arrays) for the next :meth:`flush`."""
        self.pending.append((step, dict(metrics)))

    def flush(self, tokens_per_s: float | None = None, val_loss: float | None = None) -> None:
        """Writes the kept steps; ``tokens_per_s`` and ``val_loss`` belong to the last one."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        lrs = np.asarray(self.schedule(np.asarray(steps) - 1), np.float64)
        lines = []
        for step, lr, m in zip(steps, lrs, values, strict=True):
            rec = {"step": step}
            rec.update({k: float(v) for k, v in m.items() if k not in LOAD_KEYS})
            rec["lr"] = float(lr)
            if "batch_size" in rec:
                rec["batch_size"] = int(rec["batch_size"])
            load = np.asarray(m["main_load"])
            rec["expert_load"] = load.astype(np.int64).tolist() if load.ndim == 2 else []
            if "mtp_loads" in m:
                rec["mtp_expert_load"] = np.asarray(m["mtp_loads"]).astype(np.int64).tolist()
            lines.append(rec)
        if tokens_per_s is not None:
            lines[-1]["tokens_per_s"] = tokens_per_s
        if val_loss is not None:
            lines[-1]["val_loss"] = val_loss
        with open(self.path, "a") as f:
            for rec in lines:
                f.write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
        self.pending = []


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short (a run killed writing it)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _progress(
    step: int, total: int, clock: tuple[int, float], now: float, paused=(0, 0, 0.0)
) -> str:
    """'33% of 360, ETA 4m10s': the remaining steps at the mean step time since ``clock``
    (step, time) of the run's first step (its compilation is left out), without the ``paused``
    (steps, tokens, seconds) of later batch sizes' first steps (their compilation)."""
    done = f"{100 * step / total:.0f}% of {total}"
    first, since = clock
    steps = step - first - paused[0]
    if steps <= 0:
        return done
    left = (total - step) * max(now - since - paused[2], 0.0) / steps
    minutes, seconds = divmod(round(left), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
    return f"{done}, ETA {eta}"


class _NoWriter:
    """The TensorBoard writer of processes other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


_BATCH_FIELDS = {"batch_size": None, "batch_size_ramp_start": 0, "batch_size_ramp_steps": 0,
                 "batch_size_ramp_stages": 4}  # fmt: skip


def _check_same_batches(saved: dict, t, batch_sizes: list, workdir: str) -> None:
    """Raises RunConfigError if a resumed run changes its batch sizes: the data iterator's saved
    position counts steps, and step j's windows follow from the batch sizes of steps 0 .. j.

    ``saved``: the checkpoint's metadata; ``batch_sizes``: this run's [[first step, rows], ...]
    (train_lib.batch_size_stages), which also depend on train.microbatches and the mesh's batch
    shards (the ramp's sizes are rounded to their product).
    """
    saved_train = saved.get("run_config", {}).get("train", {})
    diff = {
        f"train.{k}": (saved_train.get(k, default), t.get(k, default))
        for k, default in _BATCH_FIELDS.items()
        if saved_train and saved_train.get(k, default) != t.get(k, default)
    }
    saved_sizes = saved.get("batch_sizes")
    if not diff and saved_sizes is not None and saved_sizes != batch_sizes:
        micro = (saved_train.get("microbatches", 1), t.get("microbatches", 1))
        raise RunConfigError(
            f"{workdir} was trained with the batch sizes {saved_sizes} ([first step, rows]) and "
            f"this run would use {batch_sizes}: the ramp's sizes are rounded to multiples of "
            f"train.microbatches x the mesh's batch shards, and one changed (train.microbatches "
            f"{micro[0]} -> {micro[1]}, or the devices); the data position of a resumed run "
            "follows from them: resume with the saved settings, or use a new --workdir"
        )
    if diff:
        raise RunConfigError(
            f"{workdir} was trained with other batch sizes (saved -> now: {diff}); the data "
            "position of a resumed run follows from them: resume with the saved values, or use a "
            "new --workdir"
        )


def _check_processes(workdir: str, step: int) -> None:
    """Raises RunConfigError if checkpoint ``step`` was written by a job of another process
    count: each process resumes its own data iterator, saved as data/process_<i>-of-<n>.json."""
    folder = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "data")
    n = jax.process_count()
    if not os.path.isdir(folder) or os.path.exists(
        os.path.join(folder, f"process_{jax.process_index()}-of-{n}.json")
    ):
        return
    counts = sorted(
        {f.rsplit("-of-", 1)[1].split(".")[0] for f in os.listdir(folder) if "-of-" in f}
    )
    if counts:
        raise RunConfigError(
            f"checkpoint step {step} in {checkpoint.checkpoint_dir(workdir)} was written by a job "
            f"of {' or '.join(counts)} process(es), this one has {n}: resume it with "
            f"--num_processes={counts[0]} (any mesh), or use a new --workdir"
        )


def _check_nonfinite(tracker, skipped: int, step: int, t, manager, writer) -> int:
    """Reads the device-side tracker: logs newly skipped steps, raises NonFiniteError to stop.

    Returns the number of skipped steps so far.
    """
    tr = jax.device_get(tracker)
    stop_step, total = int(tr["stop_step"]), int(tr["skipped"])
    if stop_step:
        writer.close()
        values = f"loss {float(tr['stop_loss']):.4g}, grad_norm {float(tr['stop_grad']):.4g}"
        if t.get("skip_nonfinite", False):
            why = (
                f"{int(t.max_consecutive_skips) + 1} steps in a row up to step {stop_step} had a "
                f"non-finite loss or gradient norm ({values}), more than "
                f"config.train.max_consecutive_skips={t.max_consecutive_skips}"
            )
        else:
            why = (
                f"step {stop_step}: the loss or gradient norm is not finite ({values}); lower "
                "config.train.lr or set config.train.skip_nonfinite=True to skip such steps"
            )
        raise NonFiniteError(f"{why}; training stopped, {_last_saved(manager)}")
    if total > skipped:
        log.warning(
            "skipped %d step(s) with a non-finite loss or gradient norm by step %d (%d in all)",
            total - skipped,
            step,
            total,
        )
    return total


def _kill_once_writing(manager, step: int) -> None:
    """Test hook (env DSV3_TEST_KILL_IN_SAVE=<step>): SIGKILL this process while orbax writes
    step ``step``, as soon as its temporary folder appears."""
    folder = str(manager.directory)
    deadline = time.time() + 30
    while time.time() < deadline:
        if any(d.startswith(f"{step}.") and "tmp" in d for d in os.listdir(folder)):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)
    raise RuntimeError(f"DSV3_TEST_KILL_IN_SAVE: no temporary folder of step {step} appeared")


def _last_saved(manager) -> str:
    manager.wait_until_finished()
    last = manager.latest_step()
    return "nothing was saved" if last is None else f"the latest checkpoint is step {last}"


def _json_safe(metrics: dict) -> dict:
    """Non-finite floats as None (JSON null): the file stays strict JSON."""
    return {
        k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in metrics.items()
    }


def _changes(saved: dict, now: dict, prefix: str = "") -> dict:
    """Flat {dotted name: (saved, now)} of the settings that differ."""
    out = {}
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out
