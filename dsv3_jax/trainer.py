"""The training run behind ``train.py``: data, model, optimizer, resume, loop, logs, checkpoints."""

from __future__ import annotations

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
from dsv3_jax.config import ModelConfig, RopeScaling
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


def evaluate(graphdef, params, biases, batches) -> float:
    """Held-out loss in nats/token over every masked target of ``batches``."""
    total, count = 0.0, 0.0
    for inputs, mask in batches:
        s, n = train_lib.eval_step(graphdef, params, biases, jnp.asarray(inputs), jnp.asarray(mask))
        total, count = total + float(s), count + float(n)
    return total / count


def train(cfg, workdir: str) -> dict:
    """Trains (or resumes) and returns the final metrics (including ``val_loss``)."""
    os.makedirs(workdir, exist_ok=True)
    log.info("jax %s on %s, devices %s, python %s", jax.__version__, jax.default_backend(),
                 jax.devices(), platform.python_version())
    t = cfg.train
    train_tokens, val_tokens, vocab = prepare_data(cfg)
    mcfg = model_config(cfg, vocab)
    log.info("train tokens %d, val tokens %d, vocab %d", len(train_tokens), len(val_tokens), mcfg.vocab_size)

    model = DeepseekV3(mcfg, rngs=nnx.Rngs(t.seed))
    graphdef, params, biases = train_lib.split_model(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %s parameters", f"{n_params:,}")

    decay_start = int(t.steps * t.decay_start_fraction)
    schedule = train_lib.lr_schedule(t.lr, t.min_lr, t.warmup_steps, decay_start, t.steps)
    tx = train_lib.make_optimizer(
        schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, clip=t.clip,
        mask=train_lib.decay_mask(params, t.decay_embeddings),
    )
    opt_state = tx.init(params)
    weights = train_lib.LossWeights(t.mtp_lambda, t.balance_alpha, t.bias_gamma)
    dataset = data.make_train_dataset(train_tokens, cfg.data.seq_len, t.batch_size, t.seed)
    data_iter = iter(dataset)
    val = data.val_batches(val_tokens, cfg.data.seq_len, cfg.data.eval_batch_size, pad_id=mcfg.bos_token_id)

    manager = checkpoint.make_manager(workdir, t.keep)
    meta = checkpoint.meta_for(mcfg, None if vocab is None else vocab.original_ids, model.num_mtp)
    step = manager.latest_step() or 0
    if step:
        saved = checkpoint.restore_meta(manager, step)
        diff = {
            k: (saved["model_config"].get(k), v)
            for k, v in meta["model_config"].items()
            if saved["model_config"].get(k) != v and k not in ("dtype", "remat", "moe_impl")
        }
        if diff or saved.get("vocab") != meta["vocab"]:
            raise ValueError(
                f"{workdir} holds a run of another model (saved vs now: {diff or 'vocabulary differs'}); "
                "use a new --workdir or the saved config"
            )
        model_state, opt_state = checkpoint.restore_training(
            manager, step, nnx.state(model), opt_state, data_iter
        )
        nnx.update(model, model_state)
        graphdef, params, biases = train_lib.split_model(model)
        log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), step)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model_config": mcfg.to_dict(), "run_config": cfg.to_dict()}, f, indent=1)

    writer = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
    metrics, last = {}, time.time()
    tokens_per_step = t.batch_size * cfg.data.seq_len
    start_step = step
    while step < t.steps:
        batch = jnp.asarray(next(data_iter))
        params, biases, opt_state, metrics = train_lib.train_step(
            graphdef, tx, weights, params, biases, opt_state, batch
        )
        step += 1
        if step % t.log_every == 0 or step == t.steps or step == start_step + 1:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            steps_done = t.log_every if step % t.log_every == 0 else 1
            metrics["tokens_per_s"] = steps_done * tokens_per_step / max(now - last, 1e-9)
            metrics["lr"] = float(schedule(step - 1))
            last = now
            log.info(
                "step %d | loss %.4f | ce %.4f | mtp %.4f | lr %.2e | grad_norm %.3f | %.0f tok/s | "
                "expert load max/mean %.2f",
                step, metrics["loss"], metrics["ce"], metrics.get("mtp_ce", float("nan")), metrics["lr"],
                metrics["grad_norm"], metrics["tokens_per_s"], metrics["load_max_over_mean"],
            )
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
    if step == start_step:  # nothing left to train: report the saved model
        metrics["val_loss"] = evaluate(graphdef, params, biases, val)
        log.info("already at step %d of %d | validation loss %.4f nats/token", step, t.steps, metrics["val_loss"])
    manager.wait_until_finished()
    manager.close()
    writer.close()
    metrics["step"] = step
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics

