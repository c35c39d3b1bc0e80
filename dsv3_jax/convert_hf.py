"""Streaming conversion between HF DeepSeek-V3 checkpoints and our orbax layout, in bounded memory.

``hf_to_orbax`` writes the converted layout (``dsv3_jax.converted``: one orbax checkpoint per layer,
so nothing ever holds more than the layer being read and the layer being written), which
``dsv3_jax.load_checkpoint`` reads.

``orbax_to_hf`` writes the official HF layout back (per-expert names, MTP layers at their index,
the correction bias float32) in safetensors shards with ``model.safetensors.index.json``.

Both directions write into a temporary sibling folder and rename it when complete: an output never
looks complete until it is, and an existing output is replaced only with ``overwrite=True``. An
output that is the input, inside it or containing it is refused; temporary folders that killed
conversions left are removed by the next conversion to the same output (see ``_Output``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file
from tqdm import tqdm

from dsv3_jax import checkpoint as ckpt_lib
from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.converted import (
    FORMAT,
    META,
    dequantize_ours,
    is_converted,
    model_path,
    nest,
    read_meta,
    restore_group,
)
from dsv3_jax.hf_io import (
    BF16_DTYPE,
    FP8_DTYPE,
    SCALE_SUFFIX,
    CheckpointError,
    cast,
    layer_groups,
    open_hf_checkpoint,
    read_json,
)
from dsv3_jax.model import DeepseekV3

log = logging.getLogger("dsv3_jax")

# HF weights that the official checkpoint stores in FP8 (attention, dense MLP, experts).
_FP8_WEIGHT = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def _is_hf_folder(path: str) -> bool:
    """True if ``path`` holds an HF checkpoint (config.json and safetensors files) and no more
    than an ``orbax_to_hf`` output or an HF download holds (no sub-folders but caches)."""
    names = os.listdir(path)
    subdirs = [n for n in names if os.path.isdir(os.path.join(path, n)) and not n.startswith(".")]
    has_weights = any(n.endswith(".safetensors") for n in names)
    return "config.json" in names and has_weights and not subdirs


# ----------------------------------------------------------------------------- output folders
class _Output:
    """The output folder of a conversion, written in a private temporary sibling and renamed to
    ``out`` when complete (the temporary folder is removed on failure).

    Refused before anything is written or deleted: an output that is the input, lies inside it or
    contains it (symlinks, relative paths and trailing slashes resolved), and an existing output
    without ``overwrite``. Use as a context manager: entering creates the parent folders and the
    temporary folder ``<out>.tmp-<host>-<pid>-XXXXXXXX``; a replaced output moves to
    ``<out>.old-<host>-<pid>-XXXXXXXX`` until the new one is in place, then is removed.

    Entering also removes what earlier conversions to the same output left when they were killed:
    folders of those two forms named with this host and the pid of a process that no longer exists
    (an ``.old-`` one only once ``out`` exists, since until then it holds the previous output). A
    folder of a live pid (a conversion still running, or a reused pid), of another host, or of
    another form is kept, and a warning gives its path and size.

    ``overwrite`` replaces only what a conversion writes (``replaceable(out)``: a converted
    folder, an HF checkpoint folder) or an empty folder, never another folder of the user's (the
    working directory an empty ``--output_dir=$UNSET`` would name, a home folder, ...).

    Raises:
      ValueError: an empty output path, or the output overlaps the input (``src``).
      FileExistsError: ``out`` exists and not ``overwrite``, or it is not a conversion's output.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        overwrite: bool,
        src: str | os.PathLike | None = None,
        replaceable=lambda path: False,
        kind: str = "conversion output",
    ):
        if not os.fspath(out).strip():
            raise ValueError("the output folder (--output_dir) is empty; give a new folder")
        self.out = os.path.abspath(os.fspath(out))
        self.overwrite = overwrite
        self.tmp = None
        if src is not None:
            _refuse_overlap(src, out)
        self.replaceable, self.kind = replaceable, kind
        self._refuse_existing()

    def _refuse_existing(self):
        if not os.path.lexists(self.out):
            return
        if not self.overwrite:
            raise FileExistsError(
                f"output {self.out} exists; choose a new folder or pass --overwrite"
            )
        empty = os.path.isdir(self.out) and not os.listdir(self.out)
        if not (empty or (os.path.isdir(self.out) and self.replaceable(self.out))):
            raise FileExistsError(
                f"output {self.out} exists and is not a {self.kind}; --overwrite replaces only an "
                "earlier conversion's output or an empty folder: choose a new folder"
            )

    def _temp(self, kind: str) -> str:
        prefix = f"{os.path.basename(self.out)}.{kind}-{_HOST}-{os.getpid()}-"
        return tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(self.out))

    def __enter__(self):
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        _remove_stale(self.out)
        self._refuse_existing()  # again: it may have appeared meanwhile
        self.tmp = self._temp("tmp")
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _default_permissions(self.tmp)
        old = None
        if os.path.lexists(self.out):  # --overwrite: keep the old one until the new one is in place
            old = self._temp("old")
            os.rmdir(old)
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
        return False


_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _refuse_overlap(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Raises ValueError if ``out`` is ``src``, inside it, or contains it (paths resolved)."""
    a, b = os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(out))
    if a == b:
        why = "is the input"
    elif os.path.commonpath([a, b]) == a:
        why = "is inside the input"
    elif os.path.commonpath([a, b]) == b:
        why = "contains the input"
    else:
        return
    raise ValueError(
        f"output {os.fspath(out)} {why} {os.fspath(src)} (resolved: {b} and {a}); writing there "
        "would replace or delete the input: choose an output folder outside it"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _folder_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def _remove_stale(out: str) -> None:
    """Removes the temporary folders that killed conversions to ``out`` left (see _Output)."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    for entry in sorted(os.listdir(parent)):
        kind = next((k for k in ("tmp", "old") if entry.startswith(f"{base}.{k}-")), None)
        if kind is None:
            continue
        path = os.path.join(parent, entry)
        parts = entry[len(base) + len(kind) + 2 :].rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            why = "not named by this version (no host and pid)"
        elif parts[0] != _HOST:
            why = f"written from host {parts[0]}"
        elif _pid_alive(int(parts[1])):
            why = f"pid {parts[1]} is alive: a conversion may still be writing it"
        elif kind == "old" and not os.path.lexists(out):
            why = f"it may hold the previous {base}, which a killed --overwrite run moved there"
        else:
            size = _folder_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                log.info(
                    "removed %s (%.2f GB), left by a conversion (pid %s) that did not finish",
                    path,
                    size / 1e9,
                    parts[1],
                )
                continue
            why = "it could not be removed"
        log.warning(
            "kept %s (%.2f GB), a temporary folder of another conversion to %s: %s; remove it "
            "yourself once no conversion is writing it",
            path,
            _folder_bytes(path) / 1e9,
            out,
            why,
        )


def _default_permissions(root: str) -> None:
    """Gives a finished output the modes of a plain ``mkdir``/``open`` (mkdtemp and temp files
    are private, 0700/0600, which would hide the result from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def _progress(total_bytes: int, n_tensors: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        postfix=f"0/{n_tensors} tensors",
    )


# ----------------------------------------------------------------------------- HF -> orbax
def hf_to_orbax(
    hf_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    keep_fp8: bool = False,
    drop_mtp: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Converts an HF DeepSeek-V3 directory to the converted orbax layout, layer by layer.

    Reads tensor by tensor (safetensors maps the files), writes one orbax checkpoint per layer
    while the next layer is read: peak memory is about two layers plus a fixed overhead.

    Args:
      hf_dir: HF directory (config.json in either RoPE form; one safetensors file or an index with
        shards; float32/bf16/FP8 with ``*_scale_inv``; per-expert or fused expert names; MTP layers
        at num_hidden_layers + k).
      output_dir: the folder to create (see the module docstring for its layout).
      dtype: "bfloat16" or "float32": the stored dtype of every tensor except the router kernel
        and the correction bias (float32, as in the model) and, with ``keep_fp8``, FP8 kernels.
      keep_fp8: store FP8 weights and their scales as they are (about half the bytes of bf16;
        HF's fused ``gate_up_proj`` is stored dequantized); ``load_checkpoint`` dequantizes them
        on load, or keeps them FP8 with ``fp8=True``.
      drop_mtp: leave the MTP layers out.
      overwrite: replace an existing ``output_dir`` (only once the new one is complete).
      progress: show a progress bar on stderr (tensors, bytes, GB/s, ETA).

    Returns:
      {"tensors": HF tensors read, "bytes": their bytes in the files, "seconds", "groups"}.

    Raises:
      ValueError: ``output_dir`` is ``hf_dir``, inside it or contains it (symlinks resolved).
      FileExistsError: ``output_dir`` exists and not ``overwrite``.
      FileNotFoundError / CheckpointError: as :func:`dsv3_jax.hf_io.open_hf_checkpoint`; nothing
        is written then.
    """
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    src = os.fspath(hf_dir)
    if os.path.isfile(src) and os.path.basename(src) == "config.json":
        src = os.path.dirname(os.path.abspath(src))
    out = _Output(  # refuses a bad output before any work
        output_dir, overwrite, src, replaceable=is_converted, kind="hf_to_orbax output folder"
    )
    ck = open_hf_checkpoint(hf_dir, dtype, drop_mtp=drop_mtp)
    files, config = ck.files, ck.config
    block = files.block
    groups = ck.groups()
    hf_names = [n for _, _, entries in groups for _, hf in entries.values() for n in hf]
    total = sum(files.nbytes_of[n] for n in hf_names) + sum(
        files.nbytes_of[n + SCALE_SUFFIX] for n in hf_names if files.is_fp8(n)
    )
    start = time.time()
    with out:
        with _writer() as ckptr:
            _write_groups(ckptr, ck, groups, out.tmp, keep_fp8, total, len(hf_names), progress)
        shutil.copyfile(os.path.join(ck.path, "config.json"), os.path.join(out.tmp, "config.json"))
        meta = {
            "format": FORMAT,
            "model_config": config.to_dict(),
            "vocab": None,
            "mtp": ck.has_mtp,
            "step": 0,
            "fp8": bool(keep_fp8 and block is not None),
            "weight_block_size": list(block) if block else None,
            "dtype": dtype,
            "groups": [name for name, _, _ in groups],
            "source": os.path.abspath(ck.path),
        }
        with open(os.path.join(out.tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
    files.close()
    seconds = time.time() - start
    return {"tensors": len(hf_names), "bytes": total, "seconds": seconds, "groups": len(groups)}


def _writer() -> ocp.AsyncCheckpointer:
    """Async orbax writer for numpy trees that neither copies them first (we never modify an array
    after handing it over) nor compresses them (weights hardly compress; zstd halves throughput).
    Its checkpoints read back with ``ocp.StandardCheckpointer``."""
    numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # as the default registry
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    return ocp.AsyncCheckpointer(handler)


def _write_groups(ckptr, ck, groups, tmp, keep_fp8, total, n_tensors, progress) -> None:
    """Reads each group tensor by tensor and saves it while the next one is read."""
    files = ck.files
    bar = _progress(total, n_tensors, "hf_to_orbax", progress)
    done = 0
    for name, prefix, entries in groups:
        flat = {}
        for rel, (reader, hf) in entries.items():
            model_dtype = ck.flat[model_path(prefix, rel)].dtype
            # FP8 kept as stored, but HF's fused gate_up_proj: its gate/up split need not fall on
            # a block edge, so its scale grid cannot be split with it (stored dequantized).
            keep = (
                keep_fp8
                and all(files.is_fp8(n) for n in hf)
                and not any(n.endswith("gate_up_proj") for n in hf)
            )
            # Transposes and stacks run on the bits (numpy copies ml_dtypes types slowly).
            if keep:
                flat[rel] = _unbits(reader(lambda n: _bits(files.read_raw(n))), FP8_DTYPE)
                scale_rel = (*rel[:-1], rel[-1] + SCALE_SUFFIX)
                flat[scale_rel] = np.ascontiguousarray(reader(files.read_scale))
            else:  # dequantize, cast, transpose and stack in XLA (fused, multi-threaded)
                get = lambda n, dt=model_dtype: _read_jax(files, n, dt)
                flat[rel] = np.asarray(reader(get))
            nbytes = sum(files.nbytes_of[n] for n in hf)
            nbytes += sum(files.nbytes_of[n + SCALE_SUFFIX] for n in hf if files.is_fp8(n))
            done += len(hf)
            bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            bar.update(nbytes)
        if prefix and prefix[0] == "mtp":
            _check_mtp_copies(files, ck.config.num_hidden_layers + prefix[1])
        ckptr.wait_until_finished()  # the previous layer is on disk: at most two in memory
        ckptr.save(os.path.join(tmp, "model", name), args=ocp.args.PyTreeSave(nest(flat)))
        del flat
    ckptr.wait_until_finished()
    ckptr.close()
    bar.close()


# fp8.dequantize in XLA (fused, multi-threaded): FP8 weight [o, i] x its scale -> dtype (float32
# product, then one rounding to ``dtype``).
_dequantize_jax = jax.jit(fp8.dequantize, static_argnames=("block", "dtype"))


def _read_jax(files, name: str, dtype) -> jax.Array:
    """One tensor as a jax (CPU) array of ``dtype``, FP8 weights dequantized."""
    x = files.read_raw(name)
    if files.is_fp8(name):
        return _dequantize_jax(x, files.read_scale(name), block=files.block, dtype=jnp.dtype(dtype))
    return jnp.asarray(x).astype(dtype)


def _bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 / float8 arrays viewed as unsigned ints of their width (others unchanged)."""
    if x.dtype.kind == "V" or x.dtype in (FP8_DTYPE, BF16_DTYPE):
        return x.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize])
    return x


def _unbits(x: np.ndarray, dtype) -> np.ndarray:
    x = np.ascontiguousarray(x)
    dtype = np.dtype(dtype)
    return x.view(dtype) if x.dtype.kind == "u" and x.dtype.itemsize == dtype.itemsize else x


def _check_mtp_copies(files, layer: int) -> None:
    """Warns if an MTP layer's embedding/head copies differ from the main ones (they are dropped)."""
    for copy, main in (
        (f"model.layers.{layer}.embed_tokens.weight", "model.embed_tokens.weight"),
        (f"model.layers.{layer}.shared_head.head.weight", "lm_head.weight"),
    ):
        if copy in files and not files.same_values(copy, main):
            log.warning("%s differs from %s; the model uses %s (shared)", copy, main, main)


# ----------------------------------------------------------------------------- orbax -> HF
def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes ('5GiB' -> 5 * 2**30; a plain int is bytes), as HF's max_shard_size.

    Raises:
      ValueError: not a size, or not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(
                f"max_shard_size {size!r} is not a size like '5GB', '500MB' or 1000000"
            )
        base = 1024 if m.group(3) else 1000
        power = " KMGT".index(m.group(2).upper() or " ")
        value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"max_shard_size must be > 0 bytes, got {size!r}")
    return value


def _hf_tensors(entries: dict, group: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """One group in HF names and layout ([out, in], per-expert), the inverse of its readers."""
    out = {}
    for rel, (_, hf) in entries.items():
        for suffix in ("", SCALE_SUFFIX):
            key = (*rel[:-1], rel[-1] + suffix)
            if key not in group:
                continue
            x = group[key]
            kernel = rel[-1] == "kernel" or len(hf) > 1
            if len(hf) > 1:  # routed experts [e, in, out] -> e tensors [out, in]
                for name, xe in zip(hf, x, strict=True):
                    out[name + suffix] = np.ascontiguousarray(xe.T)
            else:
                out[hf[0] + suffix] = np.ascontiguousarray(x.T if kernel else x)
    return out


def _model_groups(model: DeepseekV3) -> dict[str, dict[tuple, np.ndarray]]:
    """Per-group numpy trees of a model in memory (a training checkpoint), as hf_to_orbax stores."""
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    groups = {}
    for name, prefix, entries in layer_groups(model.config, set(), model.num_mtp > 0):
        if prefix and prefix[0] in ("dense_layers", "moe_layers"):
            groups[name] = {rel: flat[(prefix[0], *rel)][prefix[1]] for rel in entries}
        else:
            groups[name] = {rel: flat[(*prefix, *rel)] for rel in entries}
    return groups


def orbax_to_hf(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    max_shard_size: str | int = "5GB",
    fp8: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    *,
    _model: DeepseekV3 | None = None,
) -> dict:
    """Writes an HF DeepSeek-V3 directory from a converted folder or a training checkpoint.

    Output: ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_size`` (a tensor
    larger than that gets a shard of its own), ``model.safetensors.index.json`` and
    ``config.json``; per-expert names, MTP layers at num_hidden_layers + k - 1 with the official
    copies of the embedding and head, the correction bias float32. Float32 in, float32 out: HF ->
    orbax -> HF is bit-exact.

    Args:
      checkpoint_dir: an ``hf_to_orbax`` folder (streamed one layer at a time), or a training
        workdir / checkpoints folder / step folder (loaded whole; full-vocabulary runs only).
      output_dir: the folder to create.
      max_shard_size: e.g. "5GB" (10^9 bytes) or "4GiB" or an int of bytes.
      fp8: store the attention, MLP and expert weights as official block FP8 (float8_e4m3fn +
        float32 ``weight_scale_inv``, 128x128 blocks unless the source had others); weights kept
        in FP8 by ``--keep_fp8`` are written back unchanged.
      overwrite: replace an existing ``output_dir`` once the new one is complete.
      progress: progress bar on stderr.

    Returns:
      {"tensors", "bytes" (written), "seconds", "shards"}.

    Raises:
      ValueError: ``output_dir`` is ``checkpoint_dir``, inside it or contains it (symlinks
        resolved).
      FileExistsError: ``output_dir`` exists and not ``overwrite``.
      FileNotFoundError: no converted folder or training checkpoint at ``checkpoint_dir``.
      CheckpointError: a compact-vocabulary training checkpoint (its ids are not the tokenizer's).
    """
    limit = parse_size(max_shard_size)
    src = None if _model is not None else os.path.abspath(os.fspath(checkpoint_dir))
    out = _Output(
        output_dir, overwrite, src, replaceable=_is_hf_folder, kind="HF checkpoint folder"
    )
    if _model is not None:
        meta = {"vocab": None}
        config, has_mtp, stored_block = _model.config, _model.num_mtp > 0, None
        hf_config = config.to_hf()
        model_groups = _model_groups(_model)
    elif is_converted(src):
        meta = read_meta(src)
        config = ModelConfig.from_dict(meta["model_config"])
        hf_config = read_json(os.path.join(src, "config.json"))
        has_mtp, stored_block = meta["mtp"], meta.get("weight_block_size")
        model_groups = None
    else:
        model, meta = ckpt_lib.load_checkpoint(src)
        if meta.get("vocab"):
            raise CheckpointError(
                f"{src} was trained on a compact vocabulary of {len(meta['vocab'])} ids; its "
                "embedding rows are not the tokenizer's ids, so it has no HF form"
            )
        config, has_mtp, stored_block = model.config, model.num_mtp > 0, None
        hf_config = config.to_hf()
        model_groups = _model_groups(model)
        del model
    block = tuple(
        stored_block
        or (hf_config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    )
    groups = layer_groups(config, set(), has_mtp)
    start, written, n_tensors = time.time(), 0, 0
    weight_map: dict[str, str] = {}
    shards: list[str] = []
    with out:
        ckptr = ocp.StandardCheckpointer()
        if model_groups is None:
            total = sum(_group_bytes(ckptr, os.path.join(src, "model", g[0])) for g in groups)
        else:
            total = sum(x.nbytes for g in model_groups.values() for x in g.values())
        bar = _progress(total, 0, "orbax_to_hf", progress)
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                fname = f"shard-{len(shards):05d}.safetensors"
                save_file(pending, os.path.join(out.tmp, fname), metadata={"format": "pt"})
                shards.append(fname)
                weight_map.update(dict.fromkeys(pending, fname))
                pending, pending_bytes = {}, 0

        for name, prefix, entries in groups:
            if model_groups is not None:
                group = model_groups.pop(name)
                bar.update(sum(x.nbytes for x in group.values()))
            else:
                group = restore_group(ckptr, os.path.join(src, "model", name))
                bar.update(sum(x.nbytes for x in group.values()))
                if not fp8:
                    group = dequantize_ours(group, stored_block)
                group = {k: _stored(k, v, meta["dtype"]) for k, v in group.items()}
            tensors = _hf_tensors(entries, group)
            del group
            if prefix and prefix[0] == "mtp":  # the official layout repeats embedding and head
                i = config.num_hidden_layers + prefix[1]
                for copy, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                                   ("shared_head.head.weight", "lm_head.weight")):  # fmt: skip
                    tensors[f"model.layers.{i}.{copy}"] = _read_back(
                        out.tmp, weight_map, pending, main
                    )
            if fp8:
                tensors = _to_fp8(tensors, block)
            for tname, x in tensors.items():
                if pending and pending_bytes + x.nbytes > limit:
                    flush()
                pending[tname] = x
                pending_bytes += x.nbytes
                written += x.nbytes
                n_tensors += 1
            bar.set_postfix_str(f"{n_tensors} tensors", refresh=False)
        flush()
        ckptr.close()
        bar.close()
        n = len(shards)
        final = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
        for s, f in final.items():
            os.rename(os.path.join(out.tmp, s), os.path.join(out.tmp, f))
        index = {
            "metadata": {"total_size": written},
            "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
        }
        with open(os.path.join(out.tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        hf_config = dict(hf_config)
        hf_config.pop("quantization_config", None)
        if fp8:
            hf_config["quantization_config"] = {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": list(block),
            }
        stored = config.param_dtype if model_groups is not None else meta["dtype"]
        for key in ("torch_dtype", "dtype"):
            if key in hf_config or key == "torch_dtype":
                hf_config[key] = stored
        with open(os.path.join(out.tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    return {"tensors": n_tensors, "bytes": written, "seconds": time.time() - start, "shards": n}


def save_hf(model: DeepseekV3, output_dir: str | os.PathLike, **kwargs) -> dict:
    """Writes a model in memory as an HF directory (see :func:`orbax_to_hf` for kwargs).

    Raises:
      NotImplementedError: an FP8 model (``fp8_weights``: its scales are not written yet); save
        the model loaded without ``fp8``, with ``fp8=True`` here for FP8 files.
    """
    if model.config.fp8_weights:
        raise NotImplementedError(
            "save_hf of a model with fp8_weights=True (FP8 kernels and scales) is not supported: "
            "load the checkpoint without fp8 and save that, with fp8=True for FP8 files"
        )
    return orbax_to_hf(None, output_dir, _model=model, **kwargs)


def _group_bytes(ckptr, path: str) -> int:
    tree = ckptr.metadata(path).item_metadata.tree
    leaves = jax.tree.leaves(tree, is_leaf=lambda m: hasattr(m, "shape"))
    return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves)


def _stored(rel: tuple, x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (dequantized FP8, the router kept float32) back in the stored dtype; the
    correction bias and FP8 scales stay float32."""
    if x.dtype != np.float32 or rel[-1] == "e_score_correction_bias":
        return x
    return x if rel[-1].endswith(SCALE_SUFFIX) else cast(x, jnp.dtype(dtype))


def _read_back(tmp: str, weight_map: dict, pending: dict, name: str) -> np.ndarray:
    """A tensor already written (to a shard of ``tmp``) or pending: the MTP copies."""
    if name in pending:
        return pending[name]
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(os.path.join(tmp, weight_map[name]), framework="numpy") as f:
        return f.get_tensor(name)


def _to_fp8(tensors: dict[str, np.ndarray], block) -> dict[str, np.ndarray]:
    """Quantizes the official FP8 weights of a group that are not FP8 yet; others unchanged."""
    out = {}
    for name, x in tensors.items():
        if name.endswith(SCALE_SUFFIX) or x.dtype == FP8_DTYPE or not _FP8_WEIGHT.search(name):
            out[name] = x
            continue
        q, s = fp8.quantize_np(x, block)
        out[name], out[name + SCALE_SUFFIX] = q, s
    return out
