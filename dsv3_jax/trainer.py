"""The training run behind ``train.py``: data, model, optimizer, resume, loop, logs, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tensorboardX import SummaryWriter

from dsv3_jax import checkpoint, data, train_lib
from dsv3_jax.config import IMPLEMENTATION_FIELDS, ModelConfig, RopeScaling
from dsv3_jax.model import DeepseekV3

log = logging.getLogger("dsv3_jax")


def prepare_data(cfg) -> tuple[np.ndarray, np.ndarray, data.CompactVocab | None]:
    """Token streams (in model ids) and the compact vocabulary (None for the full vocabulary)."""
    data.build_token_cache(cfg.data.cache_dir)
    train_tokens = np.asarray(data.load_tokens(cfg.data.cache_dir, "train"))
    val_tokens = np.asarray(data.load_tokens(cfg.data.cache_dir, "val"))
    if not cfg.data.compact_vocab:
        return train_tokens.astype(np.int32), val_tokens.astype(np.int32), None
    vocab = data.CompactVocab.from_tokens(train_tokens, val_tokens)
    return vocab.to_compact(train_tokens), vocab.to_compact(val_tokens), vocab


def model_config(cfg, vocab: data.CompactVocab | None) -> ModelConfig:
    fields = dict(cfg.model)
    rope_scaling = fields.get("rope_scaling")
    if isinstance(rope_scaling, (Mapping, ml_collections.ConfigDict)):  # from a config file
        fields["rope_scaling"] = RopeScaling(**dict(rope_scaling))
    if vocab is not None:
        fields.update(vocab_size=vocab.size, bos_token_id=vocab.bos, eos_token_id=vocab.eos)
    return ModelConfig(**fields)


def init_from(cfg, vocab: data.CompactVocab | None, train_tokens, val_tokens) -> DeepseekV3:
    """The model to fine-tune: weights and architecture from ``cfg.init_from``.

    ``cfg.init_from`` is a ``convert.py hf_to_orbax`` folder (original tokenizer ids), a training
    workdir or checkpoint, or an HF directory. The implementation knobs
    (``IMPLEMENTATION_FIELDS``: dtypes, remat, moe_impl, attention choices) come from
    ``cfg.model``; its architecture fields are ignored (a warning lists those that differ from
    the checkpoint's).

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
        if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
            os.path.join(path, "meta.json")
        ):
            model, saved_vocab = load_hf_checkpoint(path, dtype, **knobs), None
        else:
            model, meta = checkpoint.load_checkpoint(path, dtype=dtype, **knobs)
            saved_vocab = meta.get("vocab")
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


def evaluate(graphdef, params, biases, batches) -> float:
    """Held-out loss in nats/token over every masked target of ``batches``."""
    total, count = 0.0, 0.0
    for inputs, mask in batches:
        s, n = train_lib.eval_step(graphdef, params, biases, jnp.asarray(inputs), jnp.asarray(mask))
        total, count = total + float(s), count + float(n)
    return total / count


class RunConfigError(ValueError):
    """A run config or workdir that cannot work; raised before any data or model work."""


def check_run_config(cfg, workdir: str) -> None:
    """Raises RunConfigError naming the field for settings that cannot work."""
    for section in ("model", "data", "train"):
        if section not in cfg:
            raise RunConfigError(
                f"the config has no '{section}' section (train.py needs model, data and train; "
                "configs/deepseek_v3_671b.py describes a model only)"
            )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunConfigError(f"--workdir {workdir} exists and is not a directory")
    t, d = cfg.train, cfg.data
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "data.seq_len": d.seq_len,
                "data.eval_batch_size": d.eval_batch_size, "train.log_every": t.log_every,
                "train.eval_every": t.eval_every, "train.save_every": t.save_every, "train.keep": t.keep,
                "train.lr": t.lr}  # fmt: skip
    for name, value in positive.items():
        if not value > 0:
            raise RunConfigError(f"config.{name} must be > 0, got {value!r}")
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


def train(cfg, workdir: str) -> dict:
    """Trains (or resumes) and returns the final metrics (including ``val_loss``).

    Raises:
      RunConfigError: a setting that cannot work, or a workdir holding a run of another model.
    """
    check_run_config(cfg, workdir)
    os.makedirs(workdir, exist_ok=True)
    log.info(
        "jax %s on %s, devices %s, python %s",
        jax.__version__,
        jax.default_backend(),
        jax.devices(),
        platform.python_version(),
    )
    t = cfg.train
    train_tokens, val_tokens, vocab = prepare_data(cfg)
    if cfg.get("init_from"):
        model = init_from(cfg, vocab, train_tokens, val_tokens)
        mcfg = model.config
    else:
        mcfg = model_config(cfg, vocab)
        model = DeepseekV3(mcfg, rngs=nnx.Rngs(t.seed))
    log.info(
        "train tokens %d, val tokens %d, vocab %d",
        len(train_tokens),
        len(val_tokens),
        mcfg.vocab_size,
    )
    graphdef, params, biases = train_lib.split_model(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %s parameters", f"{n_params:,}")

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
    )
    opt_state = tx.init(params)
    weights = train_lib.LossWeights(t.mtp_lambda, t.balance_alpha, t.bias_gamma)
    dataset = data.make_train_dataset(train_tokens, cfg.data.seq_len, t.batch_size, t.seed)
    data_iter = iter(dataset)
    val = data.val_batches(
        val_tokens, cfg.data.seq_len, cfg.data.eval_batch_size, pad_id=mcfg.bos_token_id
    )

    manager = checkpoint.make_manager(workdir, t.keep)
    run_config = {"data": cfg.data.to_dict(), "train": cfg.train.to_dict()}
    meta = checkpoint.meta_for(
        mcfg,
        None if vocab is None else vocab.original_ids,
        model.num_mtp,
        {"run_config": run_config},
    )
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
        model_state, opt_state = checkpoint.restore_training(
            manager, step, nnx.state(model), opt_state, data_iter
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
    else:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"model_config": mcfg.to_dict(), "run_config": cfg.to_dict()}, f, indent=1)

    writer = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
    metrics, last = {}, time.time()
    tokens_per_step = t.batch_size * cfg.data.seq_len
    start_step = last_step = step
    while step < t.steps:
        batch = jnp.asarray(next(data_iter))
        params, biases, opt_state, metrics = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, batch
        )
        step += 1
        if step % t.log_every == 0 or step == t.steps or step == start_step + 1:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            steps_done, last_step = step - last_step, step
            first = step == start_step + 1
            if not first:  # the first step's time is mostly compilation: no throughput
                metrics["tokens_per_s"] = steps_done * tokens_per_step / max(now - last, 1e-9)
            metrics["lr"] = float(schedule(step - 1))
            last = now
            parts = [f"step {step}", f"loss {metrics['loss']:.4f}", f"ce {metrics['ce']:.4f}"]
            if "mtp_ce" in metrics:
                parts.append(f"mtp {metrics['mtp_ce']:.4f}")
            parts += [f"lr {metrics['lr']:.2e}", f"grad_norm {metrics['grad_norm']:.3f}"]
            if "tokens_per_s" in metrics:
                parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
            parts.append(f"expert load max/mean {metrics['load_max_over_mean']:.2f}")
            log.info(" | ".join(parts))
            for k, v in metrics.items():
                writer.add_scalar(f"train/{k}", v, step)
        if step % t.eval_every == 0 or step == t.steps:
            metrics["val_loss"] = evaluate(graphdef, params, biases, val)
            log.info("step %d | validation loss %.4f nats/token", step, metrics["val_loss"])
            writer.add_scalar("val/loss", metrics["val_loss"], step)
            last = time.time()
        if step % t.save_every == 0 or step == t.steps:
            state = nnx.state(nnx.merge(graphdef, params, biases))
            checkpoint.save(manager, step, state, opt_state, data_iter, meta)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    metrics["step"] = step
    if step == start_step:  # nothing left to train: report the saved model, rewrite nothing
        metrics["val_loss"] = evaluate(graphdef, params, biases, val)
        log.info(
            "already at step %d of %d | validation loss %.4f nats/token",
            step,
            t.steps,
            metrics["val_loss"],
        )
        return metrics
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


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
