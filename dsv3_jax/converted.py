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

from dsv3_jax.config import ModelConfig
from dsv3_jax.config import dtype_name as config_dtype_name
from dsv3_jax.hf_io import (
    SCALE_SUFFIX,
    CheckpointError,
    cast,
    dequantize,
    layer_groups,
    read_json,
    scale_box,
    stack_pieces,
)
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
    if prefix and prefix[0] in ("dense_layers", "moe_layers"):
        return (prefix[0], *rel)
    return (*prefix, *rel)


def read_meta(path: str) -> dict:
    return read_json(os.path.join(path, META))


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
    """Kernels kept in FP8 (ours: [.., in, out], scale [.., ceil(in/bi), ceil(out/bo)]) -> float32."""
    out = {}
    for rel, x in flat.items():
        if rel[-1].endswith(SCALE_SUFFIX):
            continue
        scale = flat.get((*rel[:-1], rel[-1] + SCALE_SUFFIX))
        out[rel] = x if scale is None else dequantize(x, scale, (block[1], block[0]))
    return out


def load_converted(
    path: str | os.PathLike,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
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


def _restore_whole(ckptr, path: str, groups: dict, flat: dict, block) -> dict[tuple, np.ndarray]:
    """Every parameter as one host array (stacks filled layer by layer)."""
    values: dict[tuple, np.ndarray] = {}
    for name, prefix in groups.items():
        group = dequantize_ours(restore_group(ckptr, os.path.join(path, "model", name)), block)
        for rel, x in group.items():
            key = model_path(prefix, rel)
            if _stacked(prefix):
                if key not in values:  # [l, ...] filled layer by layer
                    values[key] = np.empty(flat[key].shape, flat[key].dtype)
                values[key][prefix[1]] = x
            else:
                values[key] = np.asarray(x, flat[key].dtype)
    return values


def _stacked(prefix: tuple) -> bool:
    return bool(prefix) and prefix[0] in ("dense_layers", "moe_layers")


def _restore_sharded(ckptr, path, groups: dict, flat: dict, block, mesh) -> dict[tuple, jax.Array]:
    """Every parameter as a jax.Array with its abstract state's sharding on ``mesh``.

    Each group is restored into shardings (a stacked parameter's per-layer slice: its spec
    without the layer axis); a parameter is assembled once its last layer is in.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ours = None if block is None else (block[1], block[0])  # our kernels are HF's transposed
    parts: dict[tuple, dict] = {}  # model path -> {layer index (None: unstacked): (array, scale)}
    values: dict[tuple, jax.Array] = {}
    for name, prefix in groups.items():
        gpath = os.path.join(path, "model", name)
        stored = flatten(ckptr.metadata(gpath).item_metadata.tree)
        shardings = {}
        for rel in stored:
            if rel[-1].endswith(SCALE_SUFFIX):
                shardings[rel] = replicated
                continue
            spec = flat[model_path(prefix, rel)].get_value().sharding.spec
            spec = jax.sharding.PartitionSpec(*spec[1:]) if _stacked(prefix) else spec
            shardings[rel] = jax.sharding.NamedSharding(mesh, spec)
        group = restore_group(ckptr, gpath, shardings)
        for rel, x in group.items():
            if rel[-1].endswith(SCALE_SUFFIX):
                continue
            key = model_path(prefix, rel)
            scale = group.get((*rel[:-1], rel[-1] + SCALE_SUFFIX))
            layer = prefix[1] if _stacked(prefix) else None
            parts.setdefault(key, {})[layer] = (x, scale)
            n = flat[key].shape[0] if layer is not None else 1
            if len(parts[key]) == n:
                values[key] = _assemble(parts.pop(key), flat[key].get_value(), ours)
    return values


def _assemble(parts: dict, target: jax.ShapeDtypeStruct, block) -> jax.Array:
    """A parameter from its restored pieces: {None: (array, scale)} or {layer: (array, scale)}
    stacked on axis 0; FP8 pieces (with a scale) dequantized shard by shard."""
    if list(parts) == [None] and parts[None][1] is None:
        x = parts[None][0]
        return x if x.dtype == target.dtype else x.astype(target.dtype)

    def piece(layer, box) -> np.ndarray:  # the layer's shard ``box`` on the host
        x, scale = parts[layer]
        data = next(
            np.asarray(s.data) for s in x.addressable_shards if _box(s.index, x.shape) == box
        )
        if scale is not None:
            scale = np.asarray(scale)[tuple(slice(a, b) for a, b in scale_box(box, block))]
            data = dequantize(data, scale, block, offset=(box[-2][0], box[-1][0]))
        return cast(data, target.dtype)

    def shard(index) -> np.ndarray:
        box = _box(index, target.shape)
        if list(parts) == [None]:
            return np.ascontiguousarray(piece(None, box))
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
