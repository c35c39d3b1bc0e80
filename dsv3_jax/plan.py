"""Per-device memory plan for training and inference on a device mesh (V3 report 3.2, 3.4).

python -m dsv3_jax.plan --config=configs/deepseek_v3_671b.py --mesh=fsdp=16,expert=64
  [--batch=N --seq_len=S --remat=true|false] [--device_memory=141GB] [--no_measure]
  [--infer_batch=B --context=T] [--capacity_factor=F]

Everything is per device, in bytes (printed in GB = 1e9 bytes), for the model's sharding rules
(``config.sharding_rules``, default ``sharding.DEFAULT_RULES``) on a mesh of the given axis sizes.
Nothing is allocated and no mesh of real devices is built:

  parameters, gradients, AdamW moments
      from the abstract state (``model.abstract_model``: ``nnx.eval_shape``) and the rules: each
      leaf's per-device shard is its shape with every dimension divided by the sizes of the mesh
      axes ``sharding.logical_to_spec`` gives it (on a ``jax.sharding.AbstractMesh``), times its
      dtype's itemsize. Gradients have the parameters' dtypes and shardings (``train_step`` pins
      them); optax's adamw keeps two moments (mu, nu) in the parameters' dtypes, sharded alike.
      MTP modules are trained, so they are included; the correction biases have no gradient or
      moment. The main model's parameter total equals ``model.count_params(config)[0]``.
  activations
      measured, not modelled (:func:`measure_activations`): ``train_lib.train_step`` (the
      config's dtype and remat, AdamW, MTP) is compiled for one device at full width, reduced
      depth (2 dense + 2 and 2 dense + 3 MoE layers) and k routed experts, for batches of 1 and 2
      sequences of seq_len, and ``compiled.memory_analysis().temp_size_in_bytes`` is read. The
      batch difference cancels everything that does not grow with the batch (gradients and other
      weight-sized buffers, accounted above); the depth difference gives a layer's share. Then
        activations = (tokens_per_device / seq_len) * (base + (num_hidden_layers - 4) * per_layer)
      with tokens_per_device = batch * seq_len / (the batch's shards). An upper bound where the
      tensor axis would split heads, MLP widths and logits (not credited: the compile is on one
      device); reference attention (float32 scores [h, s, s]: quadratic in seq_len, no flash);
      routed experts in the blocked layout (rows padded up to 2x); XLA:GPU schedules otherwise.
  all-to-all (expert parallelism, per MoE layer, per device, forward; the backward sends as much)
      capacity-padded (``moe_dispatch="all_to_all"``, what ``moe.expert_parallel_moe`` sends on
      CPU/GPU today): dispatch + return = 2 * ep * C * d * itemsize + the int32 expert ids
      ep * C * 4, C = ``moe.ep_capacity(T, k, ep, e / ep, moe_capacity_factor)`` (T tokens per
      device). The send and receive buffers of the dispatch (2 * ep * C * d * itemsize) are added
      to the training total (one MoE layer's, under remat).
      ragged (``ragged_all_to_all``, dropless, expected under uniform routing):
      2 * T * k * (ep - 1) / ep * d * itemsize.
  latent KV cache (inference)
      ``mla.kv_cache_bytes_per_token(config, bfloat16)`` * infer_batch * context / (the batch's
      shards), main-model layers only.
  inference weights
      bf16: 2 bytes per parameter value (router kernel and correction bias float32, as built);
      FP8 (the official checkpoint's format, README_WEIGHTS.md): every projection of attention,
      dense MLP, routed and shared experts 1 byte + one float32 scale per 128x128 block, the rest
      bf16. Main model only (MTP is optional at inference). Activations are not counted.

A configuration fits when its total is at most ``HEADROOM`` (90%) of the device memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import moe, sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.mla import kv_cache_bytes_per_token
from dsv3_jax.moe import ExpertBias, ep_capacity

GB = 1e9
HEADROOM = 0.9  # usable fraction of device memory (XLA workspace, fragmentation)
FP8_BLOCK = 128  # weight_block_size of the official FP8 checkpoint
_FP8_MODULES = ("self_attn", "mlp")  # projections stored in FP8 (the router "gate" is not)


# ----------------------------------------------------------------------------- mesh flag
def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,expert=4' (or 'data:2,expert:4') -> {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}.

    Raises:
      ValueError: a malformed pair, a repeated or unknown axis (named, with the valid axes), or a
        size that is not a positive int.
    """
    axes = {name: 1 for name in sharding.MESH_AXES}
    seen = set()
    for part in text.split(","):
        name, sep, size = re.match(r"([^=:]*)([=:]?)(.*)", part.strip()).groups()
        if not sep:
            raise ValueError(f"mesh {text!r}: expected axis=size pairs such as data=2,expert=4")
        if name not in axes:
            raise ValueError(
                f"mesh {text!r}: unknown axis {name!r}; the axes are {list(sharding.MESH_AXES)}"
            )
        if name in seen:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"mesh {text!r}: axis {name!r} needs a positive int size, got {size!r}"
            )
        seen.add(name)
        axes[name] = int(size)
    return axes


def abstract_mesh(axes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh of the given axis sizes (all of ``sharding.MESH_AXES``, default 1)."""
    sizes = tuple(int(axes.get(a, 1)) for a in sharding.MESH_AXES)
    return jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)


def describe(axes: Mapping[str, int]) -> str:
    """'fsdp=16,expert=64 (1024 devices)': the axes larger than 1."""
    used = ",".join(f"{a}={axes[a]}" for a in sharding.MESH_AXES if axes.get(a, 1) > 1)
    return f"{used or 'single'} ({math.prod(axes.values())} devices)"


# ----------------------------------------------------------------------------- state
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of the model state: path, shape, dtype, logical names, kind."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: jnp.dtype
    names: tuple | None
    param: bool  # an nnx.Param (trained); False: a correction bias (ExpertBias)

    @property
    def mtp(self) -> bool:
        return self.path[0] == "mtp"

    @property
    def fp8(self) -> bool:
        """Stored as FP8 with 128x128 block scales in the official checkpoint (matrices inside
        attention, dense MLP, routed and shared experts; not the router, embeddings or heads)."""
        stacked = int(self.path[0] in ("dense_layers", "moe_layers"))
        return (
            self.param
            and any(m in self.path for m in _FP8_MODULES)
            and "gate" not in self.path
            and len(self.shape) - stacked >= 2
        )


@functools.lru_cache(maxsize=4)
def model_leaves(config: ModelConfig) -> tuple[Leaf, ...]:
    """Every array of ``DeepseekV3(config)`` (MTP included), from ``nnx.eval_shape``."""
    from dsv3_jax.model import abstract_model  # noqa: PLC0415 (model imports sharding, moe)

    _, state = abstract_model(config, mtp=True)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        names = var.get_metadata("out_sharding", None) if var.has_metadata("out_sharding") else None
        if not isinstance(var, (nnx.Param, ExpertBias)):
            raise TypeError(f"unexpected state variable {type(var).__name__} at {path}")
        leaves.append(
            Leaf(tuple(map(str, path)), tuple(value.shape), jnp.dtype(value.dtype), names,
                 isinstance(var, nnx.Param))
        )  # fmt: skip
    return tuple(leaves)


def shard_shape(leaf: Leaf, mesh: jax.sharding.AbstractMesh, rules=None) -> tuple[int, ...]:
    """The per-device shard shape of ``leaf`` under ``rules`` on ``mesh`` (every dim divided by the
    product of the mesh axes its PartitionSpec entry names; those divide it by construction)."""
    if leaf.names is None:
        return leaf.shape
    spec = sharding.logical_to_spec(leaf.names, rules, leaf.shape, mesh)
    spec = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    return tuple(
        dim // math.prod(mesh.shape[a] for a in sharding.spec_axes(entry))
        for dim, entry in zip(leaf.shape, spec, strict=True)
    )


def _fp8_bytes(shape: tuple[int, ...], full: tuple[int, ...]) -> float:
    """FP8 bytes of a shard of ``shape`` of a weight of shape ``full``: 1 byte per value plus its
    share of the float32 block scales [..., ceil(a/128), ceil(b/128)] (scales split like values)."""
    values = math.prod(shape)
    scales = (
        math.prod(full[:-2]) * math.ceil(full[-2] / FP8_BLOCK) * math.ceil(full[-1] / FP8_BLOCK)
    )
    return values + 4 * scales * values / math.prod(full)


def state_bytes(config: ModelConfig, axes: Mapping[str, int]) -> dict[str, float]:
    """Per-device bytes of the model state on a mesh of ``axes`` (sizes by axis name).

    Returns:
      {"params", "mtp_params" (the MTP share of params), "biases" (correction biases), "grads",
      "adam" (mu + nu), "weights_bf16", "weights_fp8" (main model, inference), "main_count",
      "mtp_count" (parameter values, not bytes; main_count == count_params(config)[0])}.
    """
    mesh = abstract_mesh(axes)
    rules = config.sharding_rules
    out = dict.fromkeys(
        (
            "params",
            "mtp_params",
            "biases",
            "weights_bf16",
            "weights_fp8",
            "main_count",
            "mtp_count",
        ),
        0.0,
    )
    for leaf in model_leaves(config):
        shard = shard_shape(leaf, mesh, rules)
        nbytes = math.prod(shard) * leaf.dtype.itemsize
        if not leaf.param:
            out["biases"] += nbytes
            if not leaf.mtp:
                out["weights_bf16"] += nbytes  # float32 at inference too
                out["weights_fp8"] += nbytes
            continue
        out["params"] += nbytes
        out["mtp_count" if leaf.mtp else "main_count"] += math.prod(leaf.shape)
        if leaf.mtp:
            out["mtp_params"] += nbytes
            continue
        router = "gate" in leaf.path
        out["weights_bf16"] += math.prod(shard) * (4 if router else 2)
        if leaf.fp8:
            out["weights_fp8"] += _fp8_bytes(shard, leaf.shape)
        else:
            out["weights_fp8"] += math.prod(shard) * (4 if router else 2)
    out["grads"] = out["params"]  # same dtypes and shardings (train_step pins them)
    out["adam"] = 2 * out["params"]  # optax.adamw: mu and nu in the parameters' dtypes
    out["main_count"], out["mtp_count"] = int(out["main_count"]), int(out["mtp_count"])
    return out


def batch_shards(config: ModelConfig, axes: Mapping[str, int], batch: int) -> int:
    """How many ways the rules split a batch of ``batch`` rows on the mesh (axes that do not divide
    it are dropped, as for the real arrays)."""
    spec = sharding.logical_to_spec(
        ("batch",), config.sharding_rules, (batch,), abstract_mesh(axes)
    )
    return math.prod(axes.get(a, 1) for a in sharding.spec_axes(spec[0] if spec else None))


def expert_parallel_size(config: ModelConfig, axes: Mapping[str, int], batch: int) -> int:
    """Devices the routed experts are split over for the all-to-all dispatch; 1 where the MoE takes
    the GSPMD dispatch instead (``moe.expert_parallel_plan``'s decision on this mesh and batch)."""
    plan = moe.expert_parallel_plan(config, abstract_mesh(axes), batch)
    return 1 if plan is None else plan.ep


# ----------------------------------------------------------------------------- activations
MEASURED_DENSE, MEASURED_MOE = 2, 2  # depth of the measured models (a scan of 1 layer is inlined)


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes per training sequence on one device, from compiled memory analyses.

    base: bytes per sequence of ``seq_len`` tokens of the measured model (2 dense + 2 MoE
    layers, embeddings, head, MTP). per_layer: bytes per sequence each further layer adds.
    seconds: compile time spent.
    """

    base: float
    per_layer: float
    seq_len: int
    seconds: float

    def bytes(self, config: ModelConfig, sequences: float) -> float:
        """Activations of ``sequences`` sequences (of ``seq_len``) through ``config``'s depth."""
        extra = max(config.num_hidden_layers - MEASURED_DENSE - MEASURED_MOE, 0)
        return sequences * (self.base + extra * self.per_layer)


def measured_config(config: ModelConfig, moe_layers: int) -> ModelConfig:
    """The model compiled by :func:`measure_activations`: full width, MEASURED_DENSE dense layers,
    ``moe_layers`` MoE layers, and only k routed experts (every token picks all of them, so each
    MoE layer still routes T * k rows of width d; the expert weights shrink 32x for V3, which keeps
    the compile's peak in the backward pass rather than in the weight-sized optimizer update)."""
    k = config.num_experts_per_tok
    return config.replace(
        num_hidden_layers=MEASURED_DENSE + moe_layers, first_k_dense_replace=MEASURED_DENSE,
        n_routed_experts=k, n_group=1, topk_group=1, moe_impl="blocked",
        attention_kernel="reference", sharding_rules=None,
    )  # fmt: skip


def _temp_bytes(config: ModelConfig, batch: int, seq_len: int) -> int:
    """temp_size_in_bytes of train_step compiled for one device, int32 tokens [batch, seq_len + 1]
    (abstract inputs: nothing is allocated)."""
    from dsv3_jax import train_lib  # noqa: PLC0415 (train_lib imports optax: only when measuring)

    compiled = train_lib.lower_train_step(config, batch, seq_len).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def measure_activations(config: ModelConfig, seq_len: int) -> Activations:
    """Activation bytes per sequence of ``train_step`` for ``config`` (its dtype and remat).

    Four one-device compiles of :func:`measured_config` ({2, 3} MoE layers x batch {1, 2}) read
    ``memory_analysis().temp_size_in_bytes``: the batch difference cancels every buffer that does
    not grow with the batch (gradients, weight casts), the depth difference gives a layer's share.
    The routed experts run ``moe_impl="blocked"`` (XLA:CPU lowers ``lax.ragged_dot`` to a dense
    masked product, ~100x larger), whose blocks pad the routed rows up to 2x; attention is the
    reference (scores [b, h, s, t] in float32 are materialised: quadratic in ``seq_len``). About
    20 s per compile at 671B width on a 2-core CPU.

    Raises:
      ValueError: ``seq_len`` exceeds max_position_embeddings, or the model has no MoE layers.
    """
    import time  # noqa: PLC0415

    if config.num_moe_layers < 1:
        raise ValueError("measure_activations needs a model with MoE layers")
    if not 1 <= seq_len <= config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is outside [1, {config.max_position_embeddings}]")
    start = time.perf_counter()
    per_seq = {}
    for n in (MEASURED_MOE, MEASURED_MOE + 1):
        cfg = measured_config(config, n)
        per_seq[n] = _temp_bytes(cfg, 2, seq_len) - _temp_bytes(cfg, 1, seq_len)
    base = per_seq[MEASURED_MOE]
    layer = max(per_seq[MEASURED_MOE + 1] - base, 0)
    return Activations(base, layer, seq_len, time.perf_counter() - start)


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes on one mesh (see the module docstring for each term)."""

    axes: dict
    batch: int
    seq_len: int
    infer_batch: int
    context: int
    state: dict
    tokens_per_device: float
    activations: float | None  # None: not measured
    ep: int
    capacity: int
    a2a_padded: float  # per MoE layer, forward
    a2a_ragged: float
    a2a_buffers: float  # one layer's dispatch send + receive buffers (in the training total)
    kv_cache: float

    @property
    def train_total(self) -> float:
        s = self.state
        return (
            s["params"]
            + s["biases"]
            + s["grads"]
            + s["adam"]
            + (self.activations or 0.0)
            + self.a2a_buffers
        )

    def infer_total(self, fp8: bool) -> float:
        return self.state["weights_fp8" if fp8 else "weights_bf16"] + self.kv_cache


def make_plan(
    config: ModelConfig,
    axes: Mapping[str, int],
    batch: int | None,
    seq_len: int,
    infer_batch: int,
    context: int,
    activations: Activations | None = None,
) -> Plan:
    """The per-device memory of ``config`` on a mesh of ``axes``.

    Args:
      config: the model (its dtype, param_dtype, remat, sharding_rules, moe_capacity_factor).
      axes: mesh sizes by axis name (missing axes 1). batch: global training batch in sequences
        (None: one per batch shard). seq_len: training tokens per sequence.
      infer_batch, context: sequences and cached tokens per sequence of the KV cache.
      activations: from :func:`measure_activations` (None: activations left out).

    The all-to-all terms are zero where :func:`expert_parallel_size` is 1 (GSPMD dispatch).

    Raises:
      ValueError: an unknown axis or a non-positive size (named).
    """
    unknown = sorted(set(axes) - set(sharding.MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(sharding.MESH_AXES)}")
    axes = {a: int(axes.get(a, 1)) for a in sharding.MESH_AXES}
    bad = [a for a, n in axes.items() if n < 1]
    if bad:
        raise ValueError(f"mesh axes {bad} need positive sizes, got {axes}")
    if batch is None:
        batch = math.prod(
            axes.get(a, 1) for a in sharding.mesh_axes("batch", config.sharding_rules)
        )
    tokens = batch * seq_len / batch_shards(config, axes, batch)
    ep = expert_parallel_size(config, axes, batch)
    k, d = config.num_experts_per_tok, config.hidden_size
    item = jnp.dtype(config.dtype).itemsize
    t_local = math.ceil(tokens)
    cap = ep_capacity(t_local, k, ep, config.n_routed_experts // ep, config.moe_capacity_factor)
    padded = (2 * ep * cap * d * item + ep * cap * 4) if ep > 1 else 0.0
    ragged = 2 * t_local * k * (ep - 1) / ep * d * item
    kv = kv_cache_bytes_per_token(config, jnp.bfloat16) * infer_batch * context
    kv /= batch_shards(config, axes, infer_batch)
    return Plan(
        axes=axes, batch=batch, seq_len=seq_len, infer_batch=infer_batch, context=context,
        state=state_bytes(config, axes), tokens_per_device=tokens,
        activations=None if activations is None else activations.bytes(config, tokens / seq_len),
        ep=ep, capacity=cap if ep > 1 else 0, a2a_padded=padded, a2a_ragged=ragged,
        a2a_buffers=2 * ep * cap * d * item if ep > 1 else 0.0, kv_cache=kv,
    )  # fmt: skip


def candidate_meshes(config: ModelConfig, max_devices: int = 4096):
    """Mesh shapes to search, fewest devices first: n = 1, 2, 4, ... up to ``max_devices``, tensor
    in {1, 2, 4, 8}, expert a power of two dividing n_routed_experts, fsdp the rest (fsdp shards
    every weight's embed dim; data would replicate the state, so it never saves memory)."""
    n = 1
    while n <= max_devices:
        for tensor in (1, 2, 4, 8):
            expert = 1
            while expert * tensor <= n and config.n_routed_experts % expert == 0:
                yield {"fsdp": n // (expert * tensor), "expert": expert, "tensor": tensor}
                expert *= 2
        n *= 2


def smallest_mesh(config, kind: str, device_memory: float, batch_per_shard: int, seq_len: int,
                  infer_batch: int, context: int, activations=None, max_devices: int = 4096):  # fmt: skip
    """The first mesh of :func:`candidate_meshes` on which ``kind`` fits in ``HEADROOM`` of
    ``device_memory`` bytes, with its plan; (None, None) if none up to ``max_devices``.

    kind: "train" (params, grads, AdamW, activations of ``batch_per_shard`` sequences of ``seq_len``
    per batch shard, all-to-all buffers), "bf16" or "fp8" (inference weights + KV cache of
    ``infer_batch`` x ``context``). Among meshes of the fewest devices, the smallest total wins.
    """
    if kind not in ("train", "bf16", "fp8"):
        raise ValueError(f"kind must be 'train', 'bf16' or 'fp8', got {kind!r}")
    best = None
    for axes in candidate_meshes(config, max_devices):
        n = math.prod(axes.values())
        if best is not None and n > math.prod(best[0].values()):
            break
        shards = math.prod(
            axes[a] for a in sharding.mesh_axes("batch", config.sharding_rules) if a in axes
        )
        try:
            p = make_plan(config, axes, batch_per_shard * shards, seq_len, infer_batch, context,
                          activations)  # fmt: skip
        except ValueError:  # an explicit moe_dispatch this mesh cannot run
            continue
        total = p.train_total if kind == "train" else p.infer_total(kind == "fp8")
        if total <= HEADROOM * device_memory and (best is None or total < best[2]):
            best = (axes, p, total)
    return (best[0], best[1]) if best else (None, None)


# ----------------------------------------------------------------------------- output
def format_plan(config: ModelConfig, plan: Plan, device_memory: float, count: int) -> list[str]:
    """The table for one mesh: a labelled line per term, in GB (1e9 bytes) per device."""
    s = plan.state

    def row(label: str, value: float | None, note: str = "") -> str:
        text = "not measured (--no_measure)" if value is None else f"{value / GB:9.2f} GB"
        return f"  {label:<38}{text}{note}"

    ep_note = "" if plan.ep > 1 else " (GSPMD dispatch: no all-to-all)"
    cf = config.moe_capacity_factor
    lines = [
        f"mesh {describe(plan.axes)}; training batch {plan.batch} x {plan.seq_len} tokens "
        f"({plan.tokens_per_device:,.0f} tokens per device), remat={config.remat}, "
        f"param_dtype {config.param_dtype}, dtype {config.dtype}",
        f"parameters: main model {s['main_count']:,} (count_params: {count:,}), "
        f"MTP {s['mtp_count']:,}",
        "",
        "training, per device",
        row(f"parameters ({config.param_dtype}, MTP incl.)", s["params"]),
        row("  of which MTP", s["mtp_params"]),
        row("correction biases (float32)", s["biases"]),
        row("gradients", s["grads"]),
        row("AdamW mu + nu", s["adam"]),
        row("activations (measured, scaled)", plan.activations),
        row("all-to-all buffers (one MoE layer)", plan.a2a_buffers),
        row("total", plan.train_total),
        "",
        f"all-to-all per MoE layer per device, forward (backward as much), ep={plan.ep}{ep_note}",
        row("capacity-padded", plan.a2a_padded, f"  (C={plan.capacity:,}, capacity_factor={cf})"),
        row("ragged (dropless, uniform routing)", plan.a2a_ragged),
        "",
        f"inference, per device (main model; KV cache of {plan.infer_batch} x {plan.context})",
        row("weights bf16", s["weights_bf16"]),
        row("weights FP8 (+ 128x128 block scales)", s["weights_fp8"]),
        row("latent KV cache (bf16)", plan.kv_cache),
        row("total bf16", plan.infer_total(False)),
        row("total FP8", plan.infer_total(True)),
    ]
    mem = device_memory * HEADROOM
    fits = lambda x: "fits" if x <= mem else "does NOT fit"  # noqa: E731
    lines += [
        "",
        f"on {device_memory / GB:.0f} GB devices ({HEADROOM:.0%} usable): training"
        f"{' (without activations)' if plan.activations is None else ''} {fits(plan.train_total)}, bf16 inference {fits(plan.infer_total(False))}, FP8 "
        f"inference {fits(plan.infer_total(True))}",
    ]
    return lines


def parse_bytes(text: str) -> float:
    """'141GB' -> 141e9, '80GiB' -> 80 * 2**30, '1.5TB', a plain number of bytes.

    Raises:
      ValueError: anything else.
    """
    m = re.fullmatch(r"\s*([\d.]+)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size such as 80GB or 141GB, got {text!r}")
    unit = m.group(2).upper().replace("I", "i")
    scale = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]  # fmt: skip
    return float(m.group(1)) * scale


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    """The CLI (module docstring). Flags are defined here, not at import, so importing the library
    part defines no absl flags (train.py's ``--config`` would clash)."""
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from dsv3_jax.model import count_params  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "ml_collections config file (its .model).")
    flags.DEFINE_string("mesh", None, "Mesh, e.g. fsdp=16,expert=64 (or fsdp:16,expert:64); "
                        "axes data, fsdp, expert, tensor; default: the config's mesh, else 1 device.")  # fmt: skip
    flags.DEFINE_integer("batch", None, "Global training batch in sequences (default: the "
                         "config's train.batch_size, else one sequence per batch shard).")  # fmt: skip
    flags.DEFINE_integer("seq_len", None, "Training sequence length (default: config.data.seq_len, "
                         "else 4096 as in V3 pre-training).")  # fmt: skip
    flags.DEFINE_bool("remat", None, "Override the config's model.remat.")
    flags.DEFINE_float("capacity_factor", None, "Override model.moe_capacity_factor.")
    flags.DEFINE_string("device_memory", "141GB", "Device memory for the mesh's fit line.")
    flags.DEFINE_integer("infer_batch", 32, "Inference batch (sequences) of the KV cache.")
    flags.DEFINE_integer("context", 32768, "Inference context (cached tokens per sequence).")
    flags.DEFINE_bool("no_measure", False, "Skip the compiles: activations are left out.")
    flags.DEFINE_integer("max_devices", 4096, "Largest device count the mesh search tries.")
    flags.mark_flag_as_required("config")
    FLAGS = flags.FLAGS  # noqa: N806

    def run(_):
        c = FLAGS.config
        model = dict(c.model)
        if FLAGS.remat is not None:
            model["remat"] = FLAGS.remat
        if FLAGS["capacity_factor"].present:
            model["moe_capacity_factor"] = FLAGS.capacity_factor
        try:
            config = ModelConfig.coerce(model)
            if FLAGS.mesh:
                axes = parse_mesh(FLAGS.mesh)
            else:
                mesh_cfg = dict(c.get("mesh", {}))
                axes = {a: int(v) for a, v in mesh_cfg.items() if int(v) > 0}
            memory = parse_bytes(FLAGS.device_memory)
        except (TypeError, ValueError) as err:
            sys.exit(f"error: {err}")
        batch = FLAGS.batch or c.get("train", {}).get("batch_size")
        seq_len = FLAGS.seq_len or c.get("data", {}).get("seq_len") or 4096
        acts = None
        if not FLAGS.no_measure:
            print("measuring activations (4 one-device compiles at full width)...", file=sys.stderr)
            acts = measure_activations(config, seq_len)
            print(f"  per sequence of {seq_len}: {acts.base / GB:.3f} GB (2 dense + 2 MoE layers, "
                  f"head, MTP) + {acts.per_layer / GB:.3f} GB per further layer; "
                  f"{acts.seconds:.0f} s", file=sys.stderr)  # fmt: skip
        plan = make_plan(config, axes, batch, seq_len, FLAGS.infer_batch, FLAGS.context, acts)
        print("\n".join(format_plan(config, plan, memory, count_params(config)[0])))
        print(f"\nsmallest meshes (fsdp x expert x tensor, powers of two; training: 1 sequence "
              f"of {seq_len} per batch shard; inference: batch {FLAGS.infer_batch} x "
              f"{FLAGS.context}; {HEADROOM:.0%} of memory usable):")  # fmt: skip
        for mem in (80e9, 141e9):
            for kind, label in (("train", "training"), ("bf16", "bf16 inference"),
                                ("fp8", "FP8-weight inference")):  # fmt: skip
                if kind == "train" and acts is None:
                    label += " (without activations)"
                found, p = smallest_mesh(config, kind, mem, 1, seq_len, FLAGS.infer_batch,
                                         FLAGS.context, acts, FLAGS.max_devices)  # fmt: skip
                if found is None:
                    print(f"  {mem / GB:.0f} GB, {label}: none up to {FLAGS.max_devices} devices")
                    continue
                total = p.train_total if kind == "train" else p.infer_total(kind == "fp8")
                print(f"  {mem / GB:.0f} GB, {label}: {describe(found)}, "
                      f"{total / GB:.1f} GB per device")  # fmt: skip

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
