"""The converted folder (``convert.py hf_to_orbax`` output) and its loader.

Layout (written by ``dsv3_jax.convert_hf.hf_to_orbax``), one orbax checkpoint per layer:

    OUT/config.json          the source's HF config.json
    OUT/meta.json            {"format": FORMAT, "model_config", "vocab": null, "mtp", "fp8",
                              "weight_block_size", "dtype", "groups", "source", "step": 0}
    OUT/model/head/          embed_tokens.embedding [w, d], norm.weight [d], lm_head.kernel [d, w]
    OUT/model/layer_NNN/     decoder layer NNN (HF index; MTP module k at num_hidden_layers + k - 1)
                             with our in-layer paths, kernels [in, out], routed experts stacked
                             [e, in, out]; with --keep_fp8 the FP8 kernels stay float8_e4m3fn with
                             ``<kernel>_scale_inv`` [.., ceil(in/bi), ceil(out/bo)] (HF's block
                             (bo, bi) transposed, as our kernels are)

``checkpoint.load_checkpoint`` reads it through :func:`load_converted`; ``convert_hf`` writes it
(and reads it back for ``orbax_to_hf``). Both need this module, neither needs the other's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.config import dtype_name as config_dtype_name
from dsv3_jax.hf_io import (
    SCALE_SUFFIX,
    CheckpointError,
    cast,
    contiguous,
    dequantize,
    layer_groups,
    quantize_stack,
    read_json,
    scale_box,
    stack_pieces,
)
from dsv3_jax.layers import fp8_scale_paths
from dsv3_jax.model import DeepseekV3, abstract_model, with_rules

FORMAT = "dsv3_jax-converted-hf/1"
META = "meta.json"


def is_converted(path: str | os.PathLike) -> bool:
    """True if ``path`` is an ``hf_to_orbax`` output folder."""
    meta = os.path.join(os.fspath(path), META)
    if not os.path.exists(meta):
        return False
    content = read_json(meta)
    return isinstance(content, dict) and content.get("format") == FORMAT


def read_meta(path: str) -> dict:
    return read_json(os.path.join(path, META))


def nest(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def model_path(prefix: tuple, rel: tuple) -> tuple:
    """A group entry's path in the model state (stacked layers drop the layer index)."""
    if _stacked(prefix):
        return (prefix[0], *rel)
    return (*prefix, *rel)


def _stacked(prefix: tuple) -> bool:
    return bool(prefix) and prefix[0] in ("dense_layers", "moe_layers")


def _scale_rel(rel: tuple) -> tuple:
    return (*rel[:-1], rel[-1] + SCALE_SUFFIX)


def restore_group(ckptr, path: str, shardings: dict | None = None) -> dict[tuple, np.ndarray]:
    """One group's orbax checkpoint as {path in group: array} in its stored dtypes.

    Without ``shardings``: arrays on the default device. With {path in group: Sharding}: each
    restored straight into its sharding (every device reads only its shards).
    """
    meta = flatten(ckptr.metadata(path).item_metadata.tree)
    shardings = shardings or {}
    target = {
        rel: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings.get(rel))
        for rel, m in meta.items()
    }
    return flatten(ckptr.restore(path, nest(target)))


def dequantize_ours(flat: dict[tuple, np.ndarray], block) -> dict[tuple, np.ndarray]:
    """Kernels kept in FP8 (ours: [.., in, out], scale [.., ceil(in/bi), ceil(out/bo)] for HF's
    block (bo, bi)) -> float32 (``fp8.dequantize_np``); scales dropped, the rest unchanged."""
    out = {}
    for rel, x in flat.items():
        if rel[-1].endswith(SCALE_SUFFIX):
            continue
        scale = flat.get(_scale_rel(rel))
        out[rel] = (
            x if scale is None else dequantize(np.asarray(x), np.asarray(scale), _ours(block))
        )
    return out


def _ours(block) -> tuple[int, int] | None:
    """HF's weight block (bo, bi) as the block of our transposed kernels (bi, bo)."""
    return None if block is None else (int(block[1]), int(block[0]))


def _mode(key: tuple, stored_scale: bool, scale_of: dict, block) -> str:
    """How a stored kernel becomes the model's: "plain" (as stored, cast), "dequant" (FP8 kept by
    --keep_fp8 -> float), "keep" (FP8 bytes and scales as stored: the FP8 model, 128 x 128
    blocks) or "quantize" (float, or FP8 in other blocks, -> the FP8 model's 128 x 128 blocks)."""
    if key in scale_of:
        return "keep" if stored_scale and _ours(block) == fp8.WEIGHT_BLOCK else "quantize"
    return "dequant" if stored_scale else "plain"


def _to_fp8(x, scale, block) -> tuple[np.ndarray, np.ndarray]:
    """A stored kernel (and its stored scale, or None) quantized in 128 x 128 blocks."""
    x = np.asarray(x)
    if scale is not None:
        x = dequantize(x, np.asarray(scale), _ours(block))
    return quantize_stack(x)


def load_converted(
    path: str | os.PathLike,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    fp8: bool = False,
    **config_overrides,
) -> tuple[DeepseekV3, dict]:
    """Loads an ``hf_to_orbax`` folder into the model (see ``dsv3_jax.load_checkpoint``).

    Args:
      path: the converted folder.
      dtype: parameter and computation dtype (default: the stored dtype); the router and the
        correction bias stay float32; FP8 kernels are dequantized with their scales.
      mesh: None: every array on the default device. A mesh: each group (one layer) is restored
        straight into shardings on ``mesh`` (a stacked parameter's layer gets the parameter's
        sharding without its layer axis; FP8 scales, 1/16384 of their kernel, replicated), then
        each device's shard of a stacked parameter is stacked from its layers' shards on the
        host (cast, FP8 dequantized for the shard only). Memory: this process's shards.
      rules: a sharding rules table (see ``sharding.DEFAULT_RULES``), kept as
        ``model.config.sharding_rules``; default: the ``sharding_rules`` override, else the
        default.
      fp8: the FP8 model (``fp8_weights=True``): kernels kept in FP8 by ``--keep_fp8`` keep their
        bytes and scales (no float copy); kernels stored in float (a folder converted without
        --keep_fp8, MTP's eh_proj) or in other blocks than 128 x 128 are quantized on load
        (``fp8.quantize_np``, one [in, out] matrix at a time). With a mesh, FP8 kernels and
        their scales are restored into their shardings; a kernel to quantize is restored with
        its last two dims whole on each device (a block's scale needs its rows and columns),
        quantized once per leading range (layers, experts) and cut into the shards.
      config_overrides: ModelConfig implementation fields.

    Returns:
      (model, meta); with a mesh, the model is placed on it.

    Raises:
      FileNotFoundError: a group checkpoint named by meta.json is missing.
      CheckpointError: meta.json's groups do not fit its config, or a parameter has no value.
      ValueError: a bad rules table, or ``rules`` and a different ``sharding_rules``.
    """
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    dtype_name = config_dtype_name(dtype or meta["dtype"])
    fields = {**meta["model_config"], "dtype": dtype_name, "param_dtype": dtype_name}
    if fp8:
        config_overrides = {**config_overrides, "fp8_weights": True, "fp8_training": False}
    config = ModelConfig.from_dict({**fields, **with_rules(config_overrides, rules)})
    graphdef, abstract_state = abstract_model(config, meta["mtp"], mesh)
    flat = dict(nnx.to_flat_state(abstract_state))
    groups = {name: prefix for name, prefix, _ in layer_groups(config, set(), meta["mtp"])}
    if list(groups) != meta["groups"]:
        raise CheckpointError(
            f"{path}: meta.json lists groups {meta['groups']}, its model config implies {list(groups)}"
        )
    for name in groups:
        gpath = os.path.join(path, "model", name)
        if not os.path.isdir(gpath):
            raise FileNotFoundError(f"{path}: layer checkpoint {gpath} is missing")
    block = meta.get("weight_block_size")
    ckptr = ocp.StandardCheckpointer()
    try:
        if mesh is None:
            values = _restore_whole(ckptr, path, groups, flat, block)
        else:
            values = _restore_sharded(ckptr, path, groups, flat, block, mesh)
    finally:
        ckptr.close()
    missing = sorted(".".join(map(str, p)) for p in flat if p not in values)
    if missing:
        raise CheckpointError(f"{path}: no stored value for model parameters {missing}")
    state = nnx.from_flat_state(
        [(p, flat[p].replace(jnp.asarray(values.pop(p)))) for p in list(flat)]
    )
    return nnx.merge(graphdef, state), dict(meta, step=meta.get("step", 0))


def _model_group(group: dict, prefix: tuple, flat: dict, block) -> dict[tuple, np.ndarray]:
    """One restored group as {path in group: host array} of what the model holds (kernels of
    the FP8 model with their ``*_scale_inv``; the float model's FP8 kernels dequantized)."""
    scale_of = fp8_scale_paths(flat)
    out = {}
    for rel, x in group.items():
        if rel[-1].endswith(SCALE_SUFFIX):
            continue
        scale = group.get(_scale_rel(rel))
        mode = _mode(model_path(prefix, rel), scale is not None, scale_of, block)
        if mode == "keep":
            out[rel], out[_scale_rel(rel)] = np.asarray(x), np.asarray(scale)
        elif mode == "quantize":
            out[rel], out[_scale_rel(rel)] = _to_fp8(x, scale, block)
        elif mode == "dequant":
            out[rel] = dequantize(np.asarray(x), np.asarray(scale), _ours(block))
        else:
            out[rel] = x
    return out


def _restore_whole(ckptr, path: str, groups: dict, flat: dict, block) -> dict[tuple, np.ndarray]:
    """Every parameter as one host array (stacks filled layer by layer)."""
    values: dict[tuple, np.ndarray] = {}
    for name, prefix in groups.items():
        group = restore_group(ckptr, os.path.join(path, "model", name))
        for rel, x in _model_group(group, prefix, flat, block).items():
            key = model_path(prefix, rel)
            if _stacked(prefix):
                if key not in values:  # [l, ...] filled layer by layer
                    values[key] = np.empty(flat[key].shape, flat[key].dtype)
                if values[key].dtype == fp8.NP_DTYPE:  # numpy copies ml_dtypes slowly: as bytes
                    values[key].view(np.uint8)[prefix[1]] = np.asarray(x).view(np.uint8)
                else:
                    values[key][prefix[1]] = x
            else:
                values[key] = np.asarray(x, flat[key].dtype)
    return values


def _restore_sharded(ckptr, path, groups: dict, flat: dict, block, mesh) -> dict[tuple, jax.Array]:
    """Every parameter as a jax.Array with its abstract state's sharding on ``mesh``.

    Each group is restored into shardings (a stacked parameter's per-layer slice: its spec
    without the layer axis; see :func:`load_converted` for FP8); a parameter is assembled once
    its last layer is in.
    """
    scale_of = fp8_scale_paths(flat)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    parts: dict[tuple, dict] = {}  # model path -> {layer index (None: unstacked): piece}
    values: dict[tuple, jax.Array] = {}
    for name, prefix in groups.items():
        gpath = os.path.join(path, "model", name)
        stored = flatten(ckptr.metadata(gpath).item_metadata.tree)
        stacked = _stacked(prefix)

        def sharding(key, whole_blocks=False, stacked=stacked):
            spec = tuple(flat[key].get_value().sharding.spec)
            spec = spec[1:] if stacked else spec
            if whole_blocks:  # the last two dims whole: the quantized blocks need them
                ndim = len(flat[key].shape) - stacked
                spec = (*spec, *[None] * (ndim - len(spec)))[:-2] + (None, None)
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

        modes, shardings = {}, {}
        for rel in stored:
            if rel[-1].endswith(SCALE_SUFFIX):
                continue
            key, srel = model_path(prefix, rel), _scale_rel(rel)
            modes[rel] = mode = _mode(key, srel in stored, scale_of, block)
            shardings[rel] = sharding(key, whole_blocks=mode == "quantize")
            if srel in stored:
                shardings[srel] = sharding(scale_of[key]) if mode == "keep" else replicated
        group = restore_group(ckptr, gpath, shardings)
        layer = prefix[1] if stacked else None
        for rel, mode in modes.items():
            key = model_path(prefix, rel)
            pieces = _pieces(mode, group[rel], group.get(_scale_rel(rel)), block)
            for k, piece in zip((key, scale_of.get(key)), pieces, strict=False):
                parts.setdefault(k, {})[layer] = piece
                if len(parts[k]) == (flat[k].shape[0] if stacked else 1):
                    values[k] = _assemble(parts.pop(k), flat[k].get_value())
    return values


def _pieces(mode: str, x: jax.Array, scale: jax.Array | None, block) -> tuple:
    """(kernel piece,) or (kernel piece, scale piece) of one restored layer: the restored array
    itself (its shards are the model's), or a function of a box ((start, stop) per dim of the
    layer's part of the parameter) giving that box on the host."""
    if mode in ("plain", "keep"):
        return (x,) if mode == "plain" else (x, scale)
    if mode == "dequant":
        ours = _ours(block)

        def dequantized(box):
            s = np.asarray(scale)[tuple(slice(a, b) for a, b in scale_box(box, ours))]
            return dequantize(_shard_of(x, box), s, ours, offset=(box[-2][0], box[-1][0]))

        return (dequantized,)
    slabs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def slab(lead: tuple) -> tuple[np.ndarray, np.ndarray]:  # quantized once per leading range
        if lead not in slabs:
            data = next(
                np.asarray(s.data)
                for s in x.addressable_shards
                if _box(s.index, x.shape)[:-2] == lead
            )
            s = None if scale is None else np.asarray(scale)[tuple(slice(a, b) for a, b in lead)]
            slabs[lead] = _to_fp8(data, s, block)
        return slabs[lead]

    def cut(i):
        return lambda box: slab(box[:-2])[i][(..., *(slice(a, b) for a, b in box[-2:]))]

    return cut(0), cut(1)


def _shard_of(x: jax.Array, box) -> np.ndarray:
    """The shard of ``x`` at ``box`` on the host."""
    return next(np.asarray(s.data) for s in x.addressable_shards if _box(s.index, x.shape) == box)


def _assemble(parts: dict, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A parameter from its pieces (:func:`_pieces`): {None: piece} or {layer: piece} stacked on
    axis 0, cast to the target's dtype shard by shard."""
    if list(parts) == [None] and isinstance(parts[None], jax.Array):  # restored in its sharding
        x = parts[None]
        return x if x.dtype == target.dtype else x.astype(target.dtype)
    read = {
        layer: (lambda box, x=p: _shard_of(x, box)) if isinstance(p, jax.Array) else p
        for layer, p in parts.items()
    }

    def piece(layer, box) -> np.ndarray:
        return cast(np.asarray(read[layer](box)), target.dtype)

    def shard(index) -> np.ndarray:
        box = _box(index, target.shape)
        if list(read) == [None]:
            return contiguous(piece(None, box))
        (a, b), rest = box[0], box[1:]
        return stack_pieces(b - a, lambda j: piece(a + j, rest))

    shards = {}

    def once(index) -> np.ndarray:  # devices holding the same shard share one host copy
        box = _box(index, target.shape)
        if box not in shards:
            shards[box] = shard(index)
        return shards[box]

    return jax.make_array_from_callback(target.shape, target.sharding, once)


def _box(index: tuple[slice, ...], shape) -> tuple[tuple[int, int], ...]:
    return tuple(k.indices(n)[:2] for k, n in zip(index, shape, strict=True))
