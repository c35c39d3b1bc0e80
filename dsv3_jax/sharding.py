"""The device mesh and the one table that maps logical axis names to mesh axes.

This is the only module that names mesh axes. Every parameter is created with logical names
(``out_sharding`` metadata, see ``layers.param``); a few activations are pinned with
:func:`constrain` at block boundaries, around the MoE dispatch/combine and on the logits. A rules
table maps each logical name to mesh axes; placing a model (:func:`shard_model`), building an
abstract sharded model (:func:`abstract_model`) and every constraint read the same table.

Mesh axes (MaxText's names and roles):
  data    pure data parallelism: the batch is split, every weight is replicated.
  fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split and each weight's ``embed``
          dimension too; XLA all-gathers a layer's weights inside the layer scan and reduces
          its gradients (an all-reduce on XLA:CPU; a reduce-scatter where XLA picks one).
  expert  expert parallelism: routed experts are split; outside the experts the batch is split
          over this axis too, so no device idles on the attention.
  tensor  tensor (Megatron) parallelism: heads, MLP widths and the vocabulary are split.

The default table (:data:`DEFAULT_RULES`) can be replaced by any other table of
``(logical name, mesh axis | tuple of mesh axes | None)`` pairs: pass it as ``rules=`` to
:func:`shard_model` / the loaders (it is kept in ``ModelConfig.sharding_rules``, so the
activation constraints traced later follow it too). A name the table does not list is
replicated. Axes that do not divide a dimension are left out for that array (the dimension is
replicated over them) rather than padded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("dsv3_jax")

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Activations outside the routed experts: the batch is split over every axis but ``tensor``.
BATCH_AXES = ("data", "fsdp", "expert")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # ---- parameters (logical names set in layers.py / mla.py / moe.py / model.py)
    ("layers", None),  # the layer-scan axis: every device holds every layer's shard
    ("vocab", "tensor"),  # embedding rows, output-head columns
    ("embed", "fsdp"),  # hidden_size d of every weight (ZeRO-3)
    ("mtp_concat", None),  # eh_proj input [Emb; h] (2d; its output dim is embed)
    ("q_lora", None),  # q_lora_rank: small, replicated
    ("kv_lora", None),  # kv_lora_rank (+ rope dim): the shared latent, replicated
    ("q_heads", "tensor"),  # q_b_proj / q_proj output h*(n+r) (whole heads when tensor | h)
    ("kv_heads", "tensor"),  # kv_b_proj output h*(n+v): fused key|value per head
    ("o_heads", "tensor"),  # o_proj input h*v (row-parallel)
    ("mlp", "tensor"),  # dense SwiGLU width: gate/up column-, down row-parallel
    ("shared_mlp", "tensor"),  # shared experts' width
    ("experts", "expert"),  # routed experts, stacked [e, ...]
    ("expert_mlp", "tensor"),  # routed expert width f (moe_intermediate_size)
    ("router", None),  # router kernel columns and correction bias [e]: tiny, float32, replicated
    # ---- activations (constrain)
    ("batch", BATCH_AXES),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
    ("cache_latent", None),
)


# ----------------------------------------------------------------------------- mesh
def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over all (or the given) devices.

    Args:
      axes: sizes by axis name, e.g. ``{"data": 2, "expert": 4}``; omitted axes have size 1.
        One axis may be -1: it takes the devices the others leave (``{"data": -1, "expert": 4}``
        on 8 devices is data=2). None or ``{}``: every device on ``data``.
      devices: default ``jax.devices()`` (every process's devices).

    Returns:
      A ``jax.sharding.Mesh`` with Auto axes (GSPMD propagates shardings between the pinned
      points), ordered by ``jax.make_mesh`` so that the last axes (tensor, expert) are nearest.

    Raises:
      ValueError: an unknown axis name, a size that is not a positive int, or sizes whose
        product is not the device count (all named).
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    for name, size in axes.items():
        is_int = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
        if not is_int or (size < 1 and size != -1):
            raise ValueError(
                f"mesh axis {name!r} must have a positive int size, got {size!r} (or -1: the "
                "devices the other axes leave)"
            )
    rest = [name for name, size in axes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got {rest}")
    if not axes:
        axes = {"data": len(devices)}
    if rest:
        others = math.prod(int(s) for n, s in axes.items() if n != rest[0])
        if len(devices) % others:
            sizes = ", ".join(f"{n}={s}" for n, s in axes.items() if n != rest[0])
            raise ValueError(
                f"mesh ({sizes}) needs a multiple of {others} devices for {rest[0]}=-1 (the "
                f"rest), but there are {len(devices)} ({jax.process_count()} process(es) x "
                f"{jax.local_device_count()} local)"
            )
        axes[rest[0]] = len(devices) // others
    shape = tuple(int(axes.get(name, 1)) for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        sizes = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, shape, strict=True))
        raise ValueError(
            f"mesh ({sizes}) has {math.prod(shape)} devices but there are {len(devices)} "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local); "
            "the product of the axis sizes must equal the device count"
        )
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(shape), devices=devices)


def describe(mesh: Mesh) -> str:
    """One line: axis sizes, device count, processes and devices per process."""
    sizes = ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
    per = {}
    for d in mesh.devices.flat:
        per[d.process_index] = per.get(d.process_index, 0) + 1
    procs = ", ".join(f"process {p}: {n}" for p, n in sorted(per.items()))
    return f"mesh ({sizes}) over {mesh.size} {mesh.devices.flat[0].platform} devices ({procs})"


# ----------------------------------------------------------------------------- rules
def check_rules(rules: Any) -> Rules:
    """The rules as a tuple of (name, None | str | tuple of str); ValueError names a bad entry."""
    out = []
    seen = set()
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"a sharding rule must be (logical name, mesh axes), got {entry!r}")
        name, target = entry
        if name in seen:
            raise ValueError(f"sharding rules list {name!r} twice")
        seen.add(name)
        if target is None:
            axes = None
        elif isinstance(target, str):
            axes = (target,)
        elif isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target):
            axes = tuple(target)
        else:
            raise ValueError(f"sharding rule {name!r}: mesh axes must be None, a str or a tuple "
                             f"of str, got {target!r}")  # fmt: skip
        bad = [a for a in axes or () if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r} names unknown mesh axes {bad}; the axes "
                             f"are {list(MESH_AXES)}")  # fmt: skip
        if axes is not None and len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} repeats a mesh axis: {target!r}")
        out.append((name, axes))
    return tuple(out)


def _table(rules) -> dict[str, tuple[str, ...] | None]:
    return dict(check_rules(DEFAULT_RULES if rules is None else rules))


def logical_to_spec(
    names: Sequence[str | None],
    rules: Any = None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have logical ``names``.

    Args:
      names: one logical name (or None) per dimension.
      rules: a rules table (default :data:`DEFAULT_RULES`); names it does not list are replicated.
      mesh: mesh axes of size 1 are dropped; with ``shape`` too, the axes mapped to a dimension
        they do not divide are dropped from the right until the rest divide it.

    Raises:
      ValueError: two dimensions of the array map to the same mesh axis (names both), whatever
        the mesh's sizes.
    """
    table = _table(rules)
    spec, owner = [], {}
    for name in names:  # the table's own conflicts, before any axis is dropped for this mesh
        for a in (table.get(name) or ()) if name is not None else ():
            if a in owner:
                raise ValueError(
                    f"logical axes {owner[a]!r} and {name!r} of one array {tuple(names)} both map "
                    f"to mesh axis {a!r}; fix the sharding rules"
                )
            owner[a] = name
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = tuple(axes or ())
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None:
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes = axes[:-1]
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def mesh_axes(
    name: str, rules: Any = None, mesh: Mesh | jax.sharding.AbstractMesh | None = None
) -> tuple[str, ...]:
    """The mesh axes the logical ``name`` maps to (those of size > 1 on ``mesh`` when given)."""
    axes = tuple(_table(rules).get(name) or ())
    return axes if mesh is None else tuple(a for a in axes if mesh.shape[a] > 1)


def spec_axes(spec_entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Any = None) -> jax.Array:
    """Pins ``x`` to the sharding its logical ``names`` map to, under the mesh in context.

    A no-op without a mesh (``jax.set_mesh``) of more than one device, so single-device code
    traces exactly as before. Used inside jit (a sharding constraint) and eagerly alike.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- state trees
def _names_of(var: nnx.Variable) -> tuple | None:
    return var.get_metadata("out_sharding", None) if var.has_metadata("out_sharding") else None


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh, rules: Any = None) -> Any:
    """NamedShardings for every array of ``tree`` (a model state, optimizer state, ...).

    Arrays inside an ``nnx.Variable`` with ``out_sharding`` metadata follow the rules; every other
    array (step counts, scalars) is replicated. Returns the tree with each array replaced by its
    sharding (Variables keep their metadata), usable as jit ``out_shardings`` or orbax targets.
    """

    def one(x):
        if _is_var(x):
            names = _names_of(x)
            value = x.get_value()
            if names is None or not hasattr(value, "shape"):
                spec = PartitionSpec()
            else:
                spec = logical_to_spec(names, rules, value.shape, mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec()) if hasattr(x, "shape") else x

    return jax.tree.map(one, tree, is_leaf=_is_var)


def place(tree: Any, mesh: Mesh, rules: Any = None) -> Any:
    """``tree``'s arrays moved to the shardings :func:`tree_shardings` gives."""
    shardings = tree_shardings(tree, mesh, rules)
    arrays = jax.tree.map(lambda x: x.get_value() if _is_var(x) else x, tree, is_leaf=_is_var)
    targets = jax.tree.map(lambda s: s.get_value() if _is_var(s) else s, shardings, is_leaf=_is_var)
    placed = jax.device_put(arrays, targets)
    return jax.tree.map(
        lambda v, a: v.replace(a) if _is_var(v) else a, tree, placed, is_leaf=_is_var
    )


def constrain_tree(tree: Any, rules: Any = None) -> Any:
    """Inside jit: pins every Variable-held array of ``tree`` to its rules' sharding (no-op
    without a multi-device mesh in context). For gradients, updated params, optimizer state."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return tree

    def one(x):
        if _is_var(x) and _names_of(x) is not None and hasattr(x.get_value(), "shape"):
            return x.replace(constrain(x.get_value(), _names_of(x), rules))
        return x

    return jax.tree.map(one, tree, is_leaf=_is_var)


def shard_model(model, mesh: Mesh, rules: Any = None):
    """Places a built model's parameters and correction biases on ``mesh`` (in place).

    The rules (default :data:`DEFAULT_RULES`) are stored in the model's config
    (``sharding_rules``), so the activation constraints of later calls follow the same table.

    Returns:
      The same model.
    """
    from dsv3_jax.model import with_implementation  # noqa: PLC0415 (model imports this module)

    rules = check_rules(DEFAULT_RULES if rules is None else rules)
    default = rules == check_rules(DEFAULT_RULES)  # the default table is stored as None
    with_implementation(model, sharding_rules=None if default else rules)
    state = nnx.state(model)
    nnx.update(model, place(state, mesh, rules))
    return model


def abstract_model(build: Callable[[], Any], mesh: Mesh | None = None, rules: Any = None):
    """(graphdef, abstract state) of the model ``build()`` makes, without allocating it.

    With a mesh, each leaf is a ``jax.ShapeDtypeStruct`` carrying the NamedSharding the rules
    give (restore targets for orbax, placement targets for the safetensors reader); without one,
    ``ShapeDtypeStruct``s without a sharding (callers pick the device). ``build`` runs under ``nnx.eval_shape``.
    """
    with no_mesh():
        abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    shardings = tree_shardings(state, mesh, rules)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def batch_shards(mesh: Mesh, rules: Any = None) -> int:
    """How many ways the rules split the batch on ``mesh`` (the product of "batch"'s axes)."""
    return math.prod(mesh.shape[a] for a in _table(rules).get("batch") or ())


def no_mesh():
    """A context without a mesh, for building models: flax would otherwise read their logical
    names as mesh axes (eager sharding, ``eval_shape``'s outputs); the rules place them instead."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of ``tree`` (a model, a state) are placed on, if more than one device."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


@contextmanager
def use_mesh_of(tree: Any) -> Iterator[Mesh | None]:
    """``jax.set_mesh`` of the mesh ``tree`` is placed on (nothing for a single-device model)."""
    mesh = mesh_of(tree)
    with jax.set_mesh(mesh) if mesh is not None else nullcontext():
        yield mesh


def summary(state: Any, mesh: Mesh, rules: Any = None) -> list[str]:
    """Lines 'path: shape -> spec' for each parameter group (one line per distinct path)."""
    lines = []
    for path, var in nnx.to_flat_state(state):
        names = _names_of(var)
        shape = var.get_value().shape
        spec = logical_to_spec(names, rules, shape, mesh) if names else PartitionSpec()
        lines.append(f"{'.'.join(map(str, path))}: {tuple(shape)} {names} -> {spec}")
    return lines


def summary_groups(state: Any, mesh: Mesh, rules: Any = None) -> list[str]:
    """:func:`summary` condensed for logs: one line per distinct (logical names -> spec), with
    its number of arrays and of values and its first path, largest group first."""
    groups: dict[str, list] = {}
    for path, var in nnx.to_flat_state(state):
        names = _names_of(var)
        shape = var.get_value().shape
        spec = logical_to_spec(names, rules, shape, mesh) if names else PartitionSpec()
        group = groups.setdefault(f"{names} -> {spec}", [0, 0, ".".join(map(str, path))])
        group[0] += 1
        group[1] += math.prod(shape)
    return [
        f"{key}: {n} arrays, {size:,} values (e.g. {first})"
        for key, (n, size, first) in sorted(groups.items(), key=lambda kv: -kv[1][1])
    ]
