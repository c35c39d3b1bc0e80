"""Reading HF DeepSeek-V3 safetensors checkpoints into the NNX model.

The conversion table maps each of our parameters to the checkpoint's tensor names (HF layout,
PyTorch [out, in] weights) and a transform. Decoder layer i lives in the dense stack
(i < first_k_dense_replace) or the MoE stack; MTP module k sits at layer index
num_hidden_layers + k - 1 (never a hard-coded 61).

Routed experts are read from per-expert names (``mlp.experts.{e}.gate_proj.weight``, the
checkpoint layout) or, if present, HF's fused ``mlp.experts.gate_up_proj`` [e, 2f, d] and
``mlp.experts.down_proj`` [e, d, f].
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepseekV3

log = logging.getLogger("dsv3_jax")

Reader = Callable[[Callable[[str], jax.Array]], jax.Array]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: every missing, unexpected or mis-shaped tensor."""


# ----------------------------------------------------------------------------- safetensors files
class SafetensorsDir:
    """Name -> file index over an HF directory: one ``*.safetensors`` or an index with shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            weight_map = {}
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.path}")
        missing = [f for f in files if not os.path.exists(os.path.join(self.path, f))]
        if missing:
            raise FileNotFoundError(
                f"shard files named by the index are missing in {self.path}: {missing}"
            )
        # Files not in the index (e.g. extra MTP shards) are read too.
        extra = sorted(
            f for f in os.listdir(self.path) if f.endswith(".safetensors") and f not in files
        )
        self.file_of: dict[str, str] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        for fname in files + extra:
            with safe_open(os.path.join(self.path, fname), framework="numpy") as f:
                for name in f.keys():
                    if weight_map and fname in files and weight_map.get(name, fname) != fname:
                        continue
                    self.file_of[name] = fname
                    self.shape_of[name] = tuple(f.get_slice(name).get_shape())
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, name: str) -> jax.Array:
        fname = self.file_of[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="flax")
        return self._handles[fname].get_tensor(name)


# ----------------------------------------------------------------------------- conversion table
def _t(name: str) -> Reader:
    return lambda get: get(name).T


def _same(name: str) -> Reader:
    return lambda get: get(name)


def _layer_table(prefix: str, config: ModelConfig, moe: bool, fused: bool) -> dict[str, tuple]:
    """Our in-layer path -> (reader, HF names read). ``prefix`` is 'model.layers.{i}.'."""
    p = prefix
    table = {
        "input_layernorm.weight": [f"{p}input_layernorm.weight"],
        "post_attention_layernorm.weight": [f"{p}post_attention_layernorm.weight"],
        "self_attn.kv_a_proj_with_mqa.kernel": [f"{p}self_attn.kv_a_proj_with_mqa.weight"],
        "self_attn.kv_a_layernorm.weight": [f"{p}self_attn.kv_a_layernorm.weight"],
        "self_attn.kv_b_proj.kernel": [f"{p}self_attn.kv_b_proj.weight"],
        "self_attn.o_proj.kernel": [f"{p}self_attn.o_proj.weight"],
    }
    if config.q_lora_rank is None:
        table["self_attn.q_proj.kernel"] = [f"{p}self_attn.q_proj.weight"]
    else:
        for n in ("q_a_proj.kernel", "q_a_layernorm.weight", "q_b_proj.kernel"):
            table[f"self_attn.{n}"] = [f"{p}self_attn.{n.replace('kernel', 'weight')}"]
    ours = {k: ((_t if k.endswith("kernel") else _same)(v[0]), v) for k, v in table.items()}
    if not moe:
        for n in ("gate_proj", "up_proj", "down_proj"):
            name = f"{p}mlp.{n}.weight"
            ours[f"mlp.{n}.kernel"] = (_t(name), [name])
        return ours
    ours["mlp.gate.kernel"] = (_t(f"{p}mlp.gate.weight"), [f"{p}mlp.gate.weight"])
    bias = f"{p}mlp.gate.e_score_correction_bias"
    ours["mlp.gate.e_score_correction_bias"] = (lambda get: get(bias).astype(jnp.float32), [bias])
    if config.n_shared_experts:
        for n in ("gate_proj", "up_proj", "down_proj"):
            name = f"{p}mlp.shared_experts.{n}.weight"
            ours[f"mlp.shared_experts.{n}.kernel"] = (_t(name), [name])
    e, f = config.n_routed_experts, config.moe_intermediate_size
    if fused:
        gu, dn = f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj"
        ours["mlp.gate_proj"] = (lambda get: get(gu)[:, :f].transpose(0, 2, 1), [gu])
        ours["mlp.up_proj"] = (lambda get: get(gu)[:, f:].transpose(0, 2, 1), [gu])
        ours["mlp.down_proj"] = (lambda get: get(dn).transpose(0, 2, 1), [dn])
    else:
        for n in ("gate_proj", "up_proj", "down_proj"):
            names = [f"{p}mlp.experts.{i}.{n}.weight" for i in range(e)]
            ours[f"mlp.{n}"] = (
                lambda get, names=names: jnp.stack([get(x).T for x in names]),
                names,
            )
    return ours


def conversion_table(config: ModelConfig, names: set[str], with_mtp: bool) -> dict[tuple, tuple]:
    """Our flat state path -> (reader, list of HF tensor names it reads)."""
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    table: dict[tuple, tuple] = {
        ("embed_tokens", "embedding"): (
            _same("model.embed_tokens.weight"),
            ["model.embed_tokens.weight"],
        ),
        ("norm", "weight"): (_same("model.norm.weight"), ["model.norm.weight"]),
        ("lm_head", "kernel"): (_t("lm_head.weight"), ["lm_head.weight"]),
    }
    k_dense = config.first_k_dense_replace
    for group, layers, moe in (
        ("dense_layers", range(k_dense), False),
        ("moe_layers", range(k_dense, config.num_hidden_layers), True),
    ):
        if not len(layers):
            continue
        per_layer = [_layer_table(f"model.layers.{i}.", config, moe, fused) for i in layers]
        for rel in per_layer[0]:
            readers = [t[rel][0] for t in per_layer]
            hf = [n for t in per_layer for n in t[rel][1]]
            table[(group, *rel.split("."))] = (
                lambda get, readers=readers: jnp.stack([r(get) for r in readers]),
                hf,
            )
    if with_mtp:
        for k in range(config.num_nextn_predict_layers):
            p = f"model.layers.{config.num_hidden_layers + k}."
            for rel, entry in _layer_table(p, config, True, fused).items():
                table[("mtp", k, "block", *rel.split("."))] = entry
            for ours, hf in (
                ("enorm.weight", "enorm.weight"),
                ("hnorm.weight", "hnorm.weight"),
                ("shared_head_norm.weight", "shared_head.norm.weight"),
            ):
                table[("mtp", k, *ours.split("."))] = (_same(p + hf), [p + hf])
            table[("mtp", k, "eh_proj", "kernel")] = (
                _t(p + "eh_proj.weight"),
                [p + "eh_proj.weight"],
            )
    return table


def mtp_copies(config: ModelConfig) -> set[str]:
    """The MTP layers' copies of the embedding and head: read as the shared main tensors."""
    out = set()
    for k in range(config.num_nextn_predict_layers):
        p = f"model.layers.{config.num_hidden_layers + k}."
        out |= {p + "embed_tokens.weight", p + "shared_head.head.weight"}
    return out


# ----------------------------------------------------------------------------- loading
def load_hf_checkpoint(
    path: str | os.PathLike, dtype=jnp.float32, **config_overrides
) -> DeepseekV3:
    """Loads an HF DeepSeek-V3 directory (config.json + unquantized safetensors) into the model.

    Args:
      path: directory with config.json and ``model.safetensors`` or a
        ``model.safetensors.index.json`` with shards (HF per-expert or fused expert names).
      dtype: parameter and computation dtype (the router and correction bias stay float32).
      config_overrides: ModelConfig implementation fields (e.g. ``remat=True``).

    Returns:
      DeepseekV3. Without MTP tensors in the files (transformers does not save them) the model has
      no MTP modules, and a warning says so once.

    Raises:
      FileNotFoundError: no config.json, no safetensors, or a shard named by the index missing.
      CheckpointError: every missing, unexpected and mis-shaped tensor, in one message.
    """
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no HF checkpoint directory at {path}")
    dtype_name = jnp.dtype(dtype).name
    config = ModelConfig.from_hf(path, dtype=dtype_name, param_dtype=dtype_name, **config_overrides)
    files = SafetensorsDir(path)
    names = {n for n in files.names() if not n.endswith("rotary_emb.inv_freq")}  # old HF buffers
    scales = sorted(n for n in names if n.endswith("_scale_inv"))
    if scales:
        raise CheckpointError(
            f"{os.fspath(path)} holds FP8-quantized weights ({len(scales)} *_scale_inv tensors, e.g. "
            f"{scales[0]}); this loader reads unquantized float32/bf16/fp16 checkpoints only"
        )
    mtp_prefixes = [
        f"model.layers.{config.num_hidden_layers + k}."
        for k in range(config.num_nextn_predict_layers)
    ]
    has_mtp = any(n.startswith(tuple(mtp_prefixes)) for n in names) if mtp_prefixes else False
    if config.num_nextn_predict_layers and not has_mtp:
        log.warning(
            "%s: config counts %d MTP layer(s) but the files hold no MTP tensors "
            "(transformers does not save them); loading the main model without MTP.",
            path,
            config.num_nextn_predict_layers,
        )
    abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0), mtp=has_mtp))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abstract_state))
    table = conversion_table(config, names, has_mtp)

    # Check everything before reading any data.
    wanted = {n for _, hf in table.values() for n in hf}
    missing = sorted(wanted - names)
    unexpected = sorted(names - wanted - (mtp_copies(config) if has_mtp else set()))
    unmapped = sorted(".".join(map(str, p)) for p in flat if p not in table)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if unmapped:
        problems.append(f"model parameters with no checkpoint source: {unmapped}")
    complete = {p: e for p, e in table.items() if all(n in names for n in e[1])}
    problems += _shape_problems(complete, flat, files)
    if problems:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} does not fit its config:\n  " + "\n  ".join(problems)
        )

    # The router and correction bias are float32 in the model whatever ``dtype`` is.
    values = {p: jnp.asarray(reader(files.read), flat[p].dtype) for p, (reader, _) in table.items()}
    state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
    return nnx.merge(graphdef, state)


def _shape_problems(table, flat, files: SafetensorsDir) -> list[str]:
    """Compares the shapes the readers would produce (from headers only) with the model's."""
    out = []

    def fake_get(name):
        return jnp.zeros(files.shape_of[name], jnp.float32)  # abstract under eval_shape: no memory

    for p, (reader, hf) in table.items():
        try:
            got = jax.eval_shape(lambda reader=reader: reader(fake_get)).shape
        except (ValueError, TypeError):  # stacked tensors (layers, experts) of different shapes
            shapes = [files.shape_of[n] for n in hf]
            usual = Counter(shapes).most_common(1)[0][0]
            out += [
                f"shape mismatch for {n}: file has {shape}, its {len(hf) - 1} siblings have {usual}"
                for n, shape in zip(hf, shapes, strict=True)
                if shape != usual
            ]
            continue
        want = flat[p].shape
        if tuple(got) != tuple(want):
            src = hf[0] if len(hf) == 1 else f"{hf[0]} (+{len(hf) - 1} more)"
            shapes = ", ".join(str(files.shape_of[n]) for n in hf[:2])
            out.append(
                f"shape mismatch for {src}: file has {shapes}, model expects {tuple(want)} (as {'.'.join(map(str, p))})"
            )
    return out
