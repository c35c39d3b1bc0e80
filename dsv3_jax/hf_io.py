"""Reading HF DeepSeek-V3 safetensors checkpoints (float32, bf16 or official FP8) into the NNX model.

The conversion table maps each of our parameters to the checkpoint's tensor names (HF layout,
PyTorch [out, in] weights) and a transform. Decoder layer i lives in the dense stack
(i < first_k_dense_replace) or the MoE stack; MTP module k sits at layer index
num_hidden_layers + k - 1 (never a hard-coded 61).

Routed experts are read from per-expert names (``mlp.experts.{e}.gate_proj.weight``, the
checkpoint layout) or, if present, HF's fused ``mlp.experts.gate_up_proj`` [e, 2f, d] and
``mlp.experts.down_proj`` [e, d, f].

FP8 (official DeepSeek-V3 ``quantization_config``: quant_method fp8, fmt e4m3, weight_block_size
[128, 128]): a float8_e4m3fn weight W [o, i] comes with a float32 ``<name>_scale_inv`` S of shape
[ceil(o/128), ceil(i/128)] (ceil-div: partial edge blocks exist), in whatever shard the index names;
the weight is W * S[r // 128, c // 128] (README_WEIGHTS.md of deepseek-ai/DeepSeek-V3). The block
maths (dequantisation, quantisation) is ``dsv3_jax.fp8``'s. FP8 tensors are read from the files'
bytes (:func:`read_fp8`): safetensors' numpy reader looks F8_E4M3 up on numpy, which lacks it.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig
from dsv3_jax.config import dtype_name as config_dtype_name
from dsv3_jax.fp8 import to_float32
from dsv3_jax.layers import fp8_scale_paths
from dsv3_jax.model import DeepseekV3, abstract_model, with_rules

log = logging.getLogger("dsv3_jax")

Reader = Callable[[Callable[[str], np.ndarray]], np.ndarray]
SCALE_SUFFIX = "_scale_inv"
INDEX = "model.safetensors.index.json"
# safetensors dtype names a weight may have; FP8 only on projection weights (with a scale), whose
# scale is float32 (bf16 accepted).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SCALE_DTYPES = ("F32", "BF16")
_MAY_BE_FP8 = re.compile(r"_proj(_with_mqa)?(\.weight)?$")  # q/kv/o, MLP, experts (fused), eh
FP8_DTYPE = fp8.NP_DTYPE
BF16_DTYPE = fp8.BF16_NP_DTYPE


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: every missing, unexpected or mis-shaped tensor."""


# ----------------------------------------------------------------------------- FP8 blocks
def quant_block_size(hf_config: dict) -> tuple[int, int] | None:
    """The weight block [rows, cols] of an FP8 ``quantization_config`` (None: not quantized).

    Raises:
      CheckpointError: a quant method other than fp8, a format other than e4m3, or a block size
        that is not two positive ints.
    """
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"unsupported quantization_config.quant_method {method!r} (only 'fp8', the official "
            "DeepSeek-V3 block FP8, is supported)"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"unsupported quantization_config.fmt {fmt!r} (only 'e4m3')")
    block = q.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"unsupported quantization_config.weight_block_size {block!r} (two positive ints, "
            "e.g. [128, 128])"
        )
    return int(block[0]), int(block[1])


def cast(x: np.ndarray, dtype) -> np.ndarray:
    """``x.astype(dtype)`` with a fast float32 -> bfloat16 path (round to nearest even, NaN kept
    NaN), bit-identical to ml_dtypes' cast."""
    dtype = np.dtype(dtype)
    if dtype != BF16_DTYPE or x.dtype == BF16_DTYPE:
        return x.astype(dtype, copy=False)
    u = to_float32(x).view(np.uint32)
    out = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out.view(BF16_DTYPE)


def scale_grid(shape, block: tuple[int, int]) -> tuple[int, ...]:
    """Scale shape of a weight [..., o, i] in blocks [bo, bi]: [..., ceil(o/bo), ceil(i/bi)]."""
    *lead, o, i = shape
    return (*lead, -(-o // block[0]), -(-i // block[1]))


def dequantize(
    w: np.ndarray, scale: np.ndarray, block: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """``fp8.dequantize_np`` (float32 [..., o, i] = w * scale of its block; ``offset``: a slice's
    start in the whole weight) for checkpoint tensors.

    Raises:
      CheckpointError: the scale's shape is not the grid of blocks ``w`` covers.
    """
    try:
        return fp8.dequantize_np(w, scale, block, offset)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def scale_box(box: tuple[tuple[int, int], ...], block: tuple[int, int]) -> tuple:
    """The scale blocks a weight box touches: ((start, stop) per dim) of [..., o, i] -> the box of
    its [..., ceil(o/bo), ceil(i/bi)] scale (leading dims unchanged)."""
    *lead, (r0, r1), (c0, c1) = box
    bo, bi = block
    return (*lead, (r0 // bo, -(-r1 // bo)), (c0 // bi, -(-c1 // bi)))


# ----------------------------------------------------------------------------- safetensors files
class SafetensorsDir:
    """Name -> file index over an HF directory: one ``*.safetensors`` or an index with shards.

    Reads tensor by tensor (``safe_open`` maps the file; nothing else stays in memory). FP8
    weights are paired with their ``*_scale_inv`` wherever the index puts it.

    Where each tensor comes from: with a ``model.safetensors.index.json``, its ``weight_map``
    decides for every name it lists (a copy of such a name in any other file, e.g. a consolidated
    ``model.safetensors`` or a stale shard beside the shards, is ignored with a warning); files
    outside the index may only add names the index does not list (the MTP shard transformers
    does not index). A name the index does not list, held by two files, is an error; so is, without
    an index, any name held by two files.

    Args:
      path: the directory.
      block: the FP8 weight block (rows, cols), or None for an unquantized checkpoint.

    Raises:
      FileNotFoundError: no safetensors file, or a shard named by the index missing (both named).
      CheckpointError: an index that is not JSON or has no ``weight_map`` object; a truncated or
        corrupt safetensors file (named); tensors that two files both supply (both named).
    """

    def __init__(self, path: str | os.PathLike, block: tuple[int, int] | None = None):
        self.path = os.fspath(path)
        self.block = block
        index = os.path.join(self.path, INDEX)
        weight_map = _read_weight_map(index) if os.path.exists(index) else {}
        indexed = sorted(set(weight_map.values()))
        missing = [f for f in indexed if not os.path.isfile(os.path.join(self.path, f))]
        if missing:
            example = next(n for n, f in sorted(weight_map.items()) if f == missing[0])
            raise FileNotFoundError(
                f"{index} names shard files missing from {self.path}: {missing} (e.g. "
                f"{example} -> {missing[0]})"
            )
        extra = sorted(
            f
            for f in os.listdir(self.path)
            if f.endswith(".safetensors") and f not in weight_map.values()
        )
        if not indexed and not extra:
            raise FileNotFoundError(f"no *.safetensors files in {self.path}")
        self.file_of: dict[str, str] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}  # safetensors dtype names: F32, BF16, F8_E4M3, ...
        self.nbytes_of: dict[str, int] = {}
        self.offset_of: dict[str, int] = {}  # first byte of each tensor's data in its file
        holders: dict[str, list[str]] = {}  # names the index does not list -> files holding them
        for fname in indexed + extra:
            full = os.path.join(self.path, fname)
            shadowed = []  # names the index assigns to another file
            try:
                with safe_open(full, framework="numpy") as f:
                    for name in f.keys():
                        if name in weight_map and weight_map[name] != fname:
                            shadowed.append(name)
                            continue
                        holders.setdefault(name, []).append(fname)
                        if name in self.file_of:
                            continue
                        sl = f.get_slice(name)
                        self.file_of[name] = fname
                        self.shape_of[name] = tuple(sl.get_shape())
                        self.dtype_of[name] = sl.get_dtype()
            except (SafetensorError, OSError) as err:
                raise CheckpointError(
                    f"{full} is not a readable safetensors file (truncated or corrupt?): {err}"
                ) from err
            for name, (start, end) in data_offsets(full).items():
                if self.file_of.get(name) == fname:
                    self.nbytes_of[name] = end - start
                    self.offset_of[name] = start
            if shadowed:
                log.warning(
                    "%s holds %d tensor(s) that %s assigns to other files (e.g. %s); the index "
                    "decides: those copies are ignored",
                    full,
                    len(shadowed),
                    INDEX,
                    shadowed[0],
                )
        clashes: dict[tuple[str, ...], list[str]] = {}
        for name, fnames in holders.items():
            if len(fnames) > 1:
                clashes.setdefault(tuple(fnames), []).append(name)
        if clashes:
            where = "not listed by its " + INDEX if weight_map else f"and no {INDEX} says which"
            raise CheckpointError(
                f"tensors supplied by more than one file in {self.path} ({where}): "
                + "; ".join(
                    f"{len(names)} in both {' and '.join(fnames)} (e.g. {sorted(names)[:3]})"
                    for fnames, names in sorted(clashes.items())
                )
            )

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> set[str]:
        """Every tensor name, scales included."""
        return set(self.file_of)

    def is_fp8(self, name: str) -> bool:
        return self.dtype_of.get(name, "").startswith("F8")

    def fp8_problems(self, ignore: tuple[str, ...] = ()) -> list[str]:
        """FP8 weights without a scale, scales without a weight, grids that do not fit.

        Tensors whose names start with one of ``ignore`` (e.g. dropped MTP layers) are skipped.
        """
        out = []
        names = {n for n in self.names() if not (ignore and n.startswith(ignore))}
        fp8 = sorted(n for n in names if self.is_fp8(n))
        if fp8 and self.block is None:
            out.append(
                f"FP8 tensors ({len(fp8)}, e.g. {fp8[0]}) but config.json has no "
                "quantization_config"
            )
        bad_fmt = sorted(n for n in fp8 if self.dtype_of[n] != "F8_E4M3")
        if bad_fmt:
            out.append(
                f"FP8 tensors not in e4m3 format: {[(n, self.dtype_of[n]) for n in bad_fmt]}"
            )
        no_scale = [n for n in fp8 if n + SCALE_SUFFIX not in names]
        if no_scale:
            out.append(f"FP8 tensors without a {SCALE_SUFFIX} ({len(no_scale)}): {no_scale}")
        scales = sorted(n for n in names if n.endswith(SCALE_SUFFIX))
        orphans = [s for s in scales if s[: -len(SCALE_SUFFIX)] not in names]
        if orphans:
            out.append(f"scales without their tensor ({len(orphans)}): {orphans}")
        not_fp8 = [
            s for s in scales if s not in orphans and not self.is_fp8(s[: -len(SCALE_SUFFIX)])
        ]
        if not_fp8:
            out.append(f"scales of tensors that are not FP8 ({len(not_fp8)}): {not_fp8}")
        if self.block is not None:
            for n in fp8:
                s = n + SCALE_SUFFIX
                if len(self.shape_of[n]) < 2:
                    out.append(f"FP8 tensor {n} has shape {self.shape_of[n]}, not [..., o, i]")
                elif s in names and self.shape_of[s] != scale_grid(self.shape_of[n], self.block):
                    out.append(
                        f"scale shape mismatch for {s}: file has {self.shape_of[s]}, weight "
                        f"{n} {self.shape_of[n]} in {self.block[0]}x{self.block[1]} blocks needs "
                        f"{scale_grid(self.shape_of[n], self.block)}"
                    )
        return out

    def dtype_problems(self, ignore: tuple[str, ...] = ()) -> list[str]:
        """Tensors whose stored dtype cannot be what they hold (from the headers only).

        Weights are float (F64/F32/F16/BF16), or FP8 where a block scale belongs (projection
        weights: names ending in ``_proj`` / ``_proj_with_mqa``, ``.weight`` or fused); scales are
        float32 or bfloat16. Names starting with one of ``ignore`` are skipped.
        """
        names = sorted(n for n in self.names() if not (ignore and n.startswith(ignore)))
        scales = [n for n in names if n.endswith(SCALE_SUFFIX)]
        weights = [n for n in names if not n.endswith(SCALE_SUFFIX)]
        out = []
        non_float = [
            (n, self.dtype_of[n])
            for n in weights
            if self.dtype_of[n] not in FLOAT_DTYPES and not self.is_fp8(n)
        ]
        if non_float:
            out.append(f"tensors of a non-float dtype ({len(non_float)}): {non_float}")
        stray_fp8 = [
            (n, self.dtype_of[n]) for n in weights if self.is_fp8(n) and not _MAY_BE_FP8.search(n)
        ]
        if stray_fp8:
            out.append(
                f"FP8 tensors where no scale belongs (only projection weights are FP8) "
                f"({len(stray_fp8)}): {stray_fp8}"
            )
        bad_scales = [(n, self.dtype_of[n]) for n in scales if self.dtype_of[n] not in SCALE_DTYPES]
        if bad_scales:
            out.append(f"scales not float32 or bfloat16 ({len(bad_scales)}): {bad_scales}")
        return out

    def _raw(self, name: str) -> np.ndarray:
        # Opened per read: safe_open maps the whole file, and every page read through the map
        # counts in the process's RSS until the map closes (whole shards, several per layer).
        fname = self.file_of[name]
        if self.dtype_of[name] == "F8_E4M3":
            return self._fp8(name, None)
        try:
            with safe_open(os.path.join(self.path, fname), framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"cannot read {name} from {os.path.join(self.path, fname)} (truncated or "
                f"corrupt?): {err}"
            ) from err

    def _raw_box(self, name: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        # Only the box's bytes are read (safetensors slices the mapped file).
        fname = self.file_of[name]
        if self.dtype_of[name] == "F8_E4M3":
            return self._fp8(name, box)
        try:
            with safe_open(os.path.join(self.path, fname), framework="numpy") as f:
                return f.get_slice(name)[tuple(slice(a, b) for a, b in box)]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"cannot read {name}{list(box)} from {os.path.join(self.path, fname)} "
                f"(truncated or corrupt?): {err}"
            ) from err

    def _fp8(self, name: str, box: tuple[tuple[int, int], ...] | None) -> np.ndarray:
        path = os.path.join(self.path, self.file_of[name])
        try:
            return read_fp8(path, self.offset_of[name], self.shape_of[name], box)
        except (OSError, ValueError) as err:
            where = "" if box is None else str(list(box))
            raise CheckpointError(
                f"cannot read {name}{where} from {path} (truncated or corrupt?): {err}"
            ) from err

    def read_box(self, name: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """``read(name)[a0:b0, a1:b1, ...]`` for box ((a0, b0), (a1, b1), ...), reading only those
        elements (FP8 weights: and the scale blocks they touch, dequantized to float32)."""
        x = self._raw_box(name, box)
        if self.is_fp8(name):
            scale = self._raw_box(name + SCALE_SUFFIX, scale_box(box, self.block))
            return dequantize(x, scale, self.block, offset=(box[-2][0], box[-1][0]))
        return x

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored, FP8 weights dequantized to float32 with their scale."""
        x = self._raw(name)
        if self.is_fp8(name):
            return dequantize(x, self._raw(name + SCALE_SUFFIX), self.block)
        return x

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor exactly as stored (FP8 stays float8_e4m3fn)."""
        return self._raw(name)

    def read_scale(self, name: str) -> np.ndarray:
        """The float32 scale_inv of FP8 weight ``name``."""
        return self._raw(name + SCALE_SUFFIX)

    def same_values(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether tensors a and b hold the same bytes, compared ``rows`` rows at a time."""
        if self.shape_of[a] != self.shape_of[b] or self.dtype_of[a] != self.dtype_of[b]:
            return False
        n = self.shape_of[a][0] if self.shape_of[a] else 1
        with (
            safe_open(os.path.join(self.path, self.file_of[a]), framework="numpy") as fa,
            safe_open(os.path.join(self.path, self.file_of[b]), framework="numpy") as fb,
        ):
            sa, sb = fa.get_slice(a), fb.get_slice(b)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                if _as_bits(sa[start:stop]).tobytes() != _as_bits(sb[start:stop]).tobytes():
                    return False
        return True

    def close(self) -> None:
        """Nothing stays open between reads (kept for callers that close)."""


def read_fp8(
    path: str, offset: int, shape: tuple[int, ...], box: tuple[tuple[int, int], ...] | None = None
) -> np.ndarray:
    """A float8_e4m3fn tensor (or its ``box``, (start, stop) per dim) read from a safetensors
    file's bytes: ``offset`` is its first byte (:class:`SafetensorsDir`'s ``offset_of``).

    Maps the file for the read only and copies out the box (only the pages it touches are read).
    safetensors' own numpy reader is not used: it looks the F8_E4M3 dtype up on numpy, which does
    not define it (ml_dtypes does), and this module leaves numpy as it is.
    """
    shape = tuple(int(n) for n in shape)
    box = tuple((0, n) for n in shape) if box is None else tuple(box)
    if int(np.prod(shape)) == 0 or any(b <= a for a, b in box):
        return np.zeros(tuple(max(b - a, 0) for a, b in box), FP8_DTYPE)
    mapped = np.memmap(path, np.uint8, "r", offset=offset, shape=shape)  # unmapped once dropped
    return np.array(mapped[tuple(slice(a, b) for a, b in box)]).view(FP8_DTYPE)


def data_offsets(path: str) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of each tensor in the file (from the safetensors header: 8 bytes of
    header length, the header, then the data); checks the file holds them all.

    Raises:
      CheckpointError: the file is shorter than its header says (truncated).
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    size = os.path.getsize(path)
    out = {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }
    end = max((e for _, e in out.values()), default=8 + n)
    if size < end:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, its header describes {end} bytes of tensors"
        )
    return out


def read_json(path: str) -> object:
    """A JSON file's content.

    Raises:
      CheckpointError: the file is not valid JSON (or not UTF-8), naming ``path``.
    """
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _read_weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of an index file.

    Raises:
      CheckpointError: not JSON, no ``weight_map`` object, an empty one, or an entry that is not
        a name -> ``*.safetensors`` file name in the same folder (``index`` named).
    """
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index} has no weight_map (a non-empty JSON object from tensor name to shard file)"
        )
    bad = [
        (k, v)
        for k, v in weight_map.items()
        if not isinstance(v, str) or os.path.basename(v) != v or not v.endswith(".safetensors")
    ]
    if bad:
        raise CheckpointError(
            f"{index}: weight_map entries that are not a *.safetensors file name in the same "
            f"folder ({len(bad)}): {bad[:5]}"
        )
    return weight_map


# ----------------------------------------------------------------------------- lazy tensors
Box = tuple[tuple[int, int], ...]  # (start, stop) per dimension


class Lazy(abc.ABC):
    """A tensor the conversion table makes from HF tensors, read only where it is asked for.

    The table's readers run on these as on numpy arrays (``.T``, ``.transpose``, basic slices,
    ``.astype``, :func:`stack_pieces`) and build a small expression; :meth:`read` of a box then
    reads from the files only the elements of that box (one HF tensor at a time): the sliced
    read that places each device's shard of a parameter without a host copy of the whole model.
    """

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> Lazy:  # noqa: N802 (numpy's name)
        return _Transposed(self, tuple(reversed(range(self.ndim))))

    def transpose(self, *axes: int) -> Lazy:
        return _Transposed(self, tuple(axes))

    def astype(self, dtype) -> Lazy:
        return _Cast(self, np.dtype(dtype))

    def __getitem__(self, key) -> Lazy:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or not all(isinstance(k, slice) for k in key):
            raise TypeError(
                f"Lazy views take basic slices only (the conversion table uses no other), got {key!r}"
            )
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges = []
        for k, n in zip(key, self.shape, strict=True):
            start, stop, step = k.indices(n)
            if step != 1:
                raise ValueError(f"Lazy views take step-1 slices only, got {key!r}")
            ranges.append((start, max(start, stop)))
        return _Sliced(self, tuple(ranges))

    @abc.abstractmethod
    def read(self, box: Box) -> np.ndarray:
        """The elements in ``box`` ((start, stop) per dimension) as a numpy array."""


class _Leaf(Lazy):
    """A tensor of the files; ``raw``: as stored (FP8 stays float8), else FP8 dequantized."""

    def __init__(self, files: SafetensorsDir, name: str, raw: bool = False):
        self.files, self.name, self.shape = files, name, tuple(files.shape_of[name])
        self.raw = raw

    def read(self, box: Box) -> np.ndarray:
        if self.raw:
            return self.files._raw_box(self.name, box)
        return self.files.read_box(self.name, box)


class _Transposed(Lazy):  # out axis k is the child's axis perm[k]
    def __init__(self, child: Lazy, perm: tuple[int, ...]):
        if sorted(perm) != list(range(child.ndim)):
            raise ValueError(f"bad transpose {perm} of a {child.ndim}-d tensor")
        self.child, self.perm = child, perm
        self.shape = tuple(child.shape[a] for a in perm)

    def read(self, box: Box) -> np.ndarray:
        inner = [None] * len(box)
        for k, a in enumerate(self.perm):
            inner[a] = box[k]
        return self.child.read(tuple(inner)).transpose(self.perm)


class _Sliced(Lazy):
    def __init__(self, child: Lazy, ranges: Box):
        self.child, self.starts = child, tuple(a for a, _ in ranges)
        self.shape = tuple(b - a for a, b in ranges)

    def read(self, box: Box) -> np.ndarray:
        return self.child.read(
            tuple((s + a, s + b) for s, (a, b) in zip(self.starts, box, strict=True))
        )


class _Cast(Lazy):
    def __init__(self, child: Lazy, dtype: np.dtype):
        self.child, self.dtype, self.shape = child, dtype, child.shape

    def read(self, box: Box) -> np.ndarray:
        return self.child.read(box).astype(self.dtype, copy=False)


class _Stacked(Lazy):  # pieces stacked on a new axis 0 (layers, experts)
    def __init__(self, pieces: list[Lazy]):
        shapes = {p.shape for p in pieces}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack shapes {sorted(shapes)}")
        self.pieces, self.shape = pieces, (len(pieces), *pieces[0].shape)

    def read(self, box: Box) -> np.ndarray:
        (a, b), rest = box[0], box[1:]
        return stack_pieces(b - a, lambda j: self.pieces[a + j].read(rest))


def read_sharded(lazy: Lazy, shape, dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """A jax.Array of ``sharding`` whose shards are read from ``lazy`` box by box.

    Each distinct shard is read once (devices holding the same shard share it) and cast to
    ``dtype`` on the host; nothing else of the tensor is read. Memory: this process's shards of
    this array (plus one HF tensor's piece while a stack is filled).

    Raises:
      ValueError: ``lazy`` does not have ``shape``.
    """
    shape = tuple(shape)
    if tuple(lazy.shape) != shape:
        raise ValueError(f"lazy tensor of shape {lazy.shape}, target shape {shape}")
    shards: dict[Box, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        box = tuple(k.indices(n)[:2] for k, n in zip(index, shape, strict=True))
        if box not in shards:
            shards[box] = contiguous(cast(lazy.read(box), dtype))
        return shards[box]

    return jax.make_array_from_callback(shape, sharding, shard)


def contiguous(x: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray`` copying ml_dtypes arrays as unsigned ints (numpy copies those
    types element by element)."""
    return np.ascontiguousarray(_as_bits(x)).view(x.dtype)


# ----------------------------------------------------------------------------- FP8 weights
def keeps_fp8(files: SafetensorsDir, hf: list[str]) -> bool:
    """Whether a model kernel read from HF tensors ``hf`` can take their FP8 bytes and scales as
    they are: every tensor FP8 in 128 x 128 blocks (the FP8 GEMM's), and a reader that only
    transposes and stacks them (every table entry but HF's fused ``gate_up_proj``, whose gate/up
    split need not fall on a block edge)."""
    return (
        files.block == fp8.WEIGHT_BLOCK
        and all(files.is_fp8(n) for n in hf)
        and not any(n.endswith("gate_up_proj") for n in hf)
    )


def quantize_stack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fp8.quantize_np`` of [..., r, c] in 128 x 128 blocks, one [r, c] matrix at a time
    (memory: the float32 work of one matrix)."""
    x = np.asarray(x)
    if x.ndim == 2:
        return fp8.quantize_np(x, fp8.WEIGHT_BLOCK)
    q = np.empty(x.shape, FP8_DTYPE)
    scale = np.empty(fp8.scale_shape(x.shape, fp8.WEIGHT_BLOCK), np.float32)
    bits = _as_bits(q)
    for i in np.ndindex(x.shape[:-2]):
        qi, scale[i] = fp8.quantize_np(x[i], fp8.WEIGHT_BLOCK)
        bits[i] = _as_bits(qi)
    return q, scale


def read_fp8_kernel(
    files: SafetensorsDir, reader: Reader, hf: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """An FP8 model kernel [..., in, out] and its scale_inv [..., ceil(in/128), ceil(out/128)].

    FP8 tensors (:func:`keeps_fp8`) keep their bytes: the reader transposes and stacks them as
    bytes, and their [ceil(o/128), ceil(i/128)] scale grids the same way (the grid of a transpose
    is the transposed grid). Anything else (bf16/float32 tensors, other blocks, fused gate_up) is
    read in float (FP8 dequantized) and quantized with ``fp8.quantize_np``, one matrix at a time.
    """
    if keeps_fp8(files, hf):
        values = reader(lambda n: files.read_raw(n).view(np.uint8))
        scale = reader(lambda n: to_float32(files.read_scale(n)))
        return contiguous(np.asarray(values)).view(FP8_DTYPE), contiguous(np.asarray(scale))
    return quantize_stack(reader(files.read))


def read_fp8_kernel_sharded(
    files: SafetensorsDir, reader: Reader, hf: list[str], target, scale_target
) -> tuple[jax.Array, jax.Array]:
    """:func:`read_fp8_kernel` shard by shard: jax.Arrays with the shardings of ``target`` and
    ``scale_target`` (ShapeDtypeStructs).

    Bytes kept: every shard read as a slice of the FP8 tensors and of their scale grids
    (:func:`read_sharded`). Quantized: each distinct range of the leading dims (layers, experts)
    of this process's shards is read whole over the last two dims (a scale covers its block's
    rows and columns), quantized once and cut into the shards; memory: those ranges' FP8 values.
    """
    if keeps_fp8(files, hf):
        values = reader(lambda n: _Leaf(files, n, raw=True))
        scale = reader(lambda n: _Cast(_Leaf(files, n + SCALE_SUFFIX), np.dtype(np.float32)))
        return (
            read_sharded(values, target.shape, FP8_DTYPE, target.sharding),
            read_sharded(scale, scale_target.shape, np.float32, scale_target.sharding),
        )
    lazy = reader(lambda n: _Leaf(files, n))
    *_, r, c = lazy.shape
    slabs: dict[Box, tuple[np.ndarray, np.ndarray]] = {}

    def slab(index, shape) -> tuple[np.ndarray, np.ndarray]:
        lead = tuple(k.indices(n)[:2] for k, n in zip(index[:-2], shape[:-2], strict=True))
        if lead not in slabs:
            slabs[lead] = quantize_stack(lazy.read((*lead, (0, r), (0, c))))
        return slabs[lead]

    def values_shard(index):
        return contiguous(slab(index, target.shape)[0][(..., *index[-2:])])

    def scale_shard(index):
        return np.ascontiguousarray(slab(index, scale_target.shape)[1][(..., *index[-2:])])

    return (
        jax.make_array_from_callback(target.shape, target.sharding, values_shard),
        jax.make_array_from_callback(scale_target.shape, scale_target.sharding, scale_shard),
    )


# ----------------------------------------------------------------------------- conversion table
def stack_pieces(n: int, piece: Callable[[int], np.ndarray]):
    """Stacks piece(0..n-1) on a new axis 0 into one preallocated numpy array, one piece at a time
    (memory: the result plus one piece); jnp.stack under jax.eval_shape (shape checks only); a
    :class:`Lazy` stack of :class:`Lazy` pieces.

    Raises:
      ValueError: pieces of different shapes.
    """
    first = piece(0)
    if isinstance(first, jax.core.Tracer):
        return jnp.stack([first, *(piece(j) for j in range(1, n))])
    if isinstance(first, Lazy):
        return _Stacked([first, *(piece(j) for j in range(1, n))])
    first = np.asarray(first)
    out = np.empty((n, *first.shape), first.dtype)
    bits = _as_bits(out)
    bits[0] = _as_bits(first)
    del first
    for j in range(1, n):
        x = np.asarray(piece(j))
        if x.shape != out.shape[1:]:
            raise ValueError(f"cannot stack shapes {out.shape[1:]} and {x.shape}")
        bits[j] = _as_bits(x)
    return out


def _as_bits(x: np.ndarray) -> np.ndarray:
    """ml_dtypes arrays (bfloat16, float8) as unsigned ints: numpy copies those types slowly."""
    if x.dtype.kind == "V":
        return x.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize])
    return x


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
    ours["mlp.gate.e_score_correction_bias"] = (lambda get: get(bias).astype(np.float32), [bias])
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
                lambda get, names=names: stack_pieces(len(names), lambda j: get(names[j]).T),
                names,
            )
    return ours


def layer_groups(
    config: ModelConfig, names: set[str], with_mtp: bool
) -> list[tuple[str, tuple, dict[tuple, tuple]]]:
    """The checkpoint as groups read and written one at a time: a decoder layer, an MTP module,
    or the head group (embedding, final norm, lm_head).

    Returns:
      [(group name, model prefix, {path in group: (reader, HF names)})] in file order. Group names
      are ``head``, ``layer_{i:03d}`` (HF layer index i, MTP modules included at
      num_hidden_layers + k - 1). The model prefix says where the group sits in the model state:
      () for head, ("dense_layers", j) / ("moe_layers", j) for decoder layers (j: index in the
      stack), ("mtp", k) for MTP modules (paths in the group start with "block" for its layer).
    """
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    head = {
        ("embed_tokens", "embedding"): (
            _same("model.embed_tokens.weight"),
            ["model.embed_tokens.weight"],
        ),
        ("norm", "weight"): (_same("model.norm.weight"), ["model.norm.weight"]),
        ("lm_head", "kernel"): (_t("lm_head.weight"), ["lm_head.weight"]),
    }
    groups = [("head", (), head)]
    k_dense = config.first_k_dense_replace
    for i in range(config.num_hidden_layers):
        moe = i >= k_dense
        prefix = ("moe_layers", i - k_dense) if moe else ("dense_layers", i)
        entries = _layer_table(f"model.layers.{i}.", config, moe, fused)
        groups.append(
            (f"layer_{i:03d}", prefix, {tuple(k.split(".")): v for k, v in entries.items()})
        )
    if with_mtp:
        for k in range(config.num_nextn_predict_layers):
            i = config.num_hidden_layers + k
            p = f"model.layers.{i}."
            entries = {
                ("block", *rel.split(".")): e
                for rel, e in _layer_table(p, config, True, fused).items()
            }
            for ours, hf in (
                ("enorm.weight", "enorm.weight"),
                ("hnorm.weight", "hnorm.weight"),
                ("shared_head_norm.weight", "shared_head.norm.weight"),
            ):
                entries[tuple(ours.split("."))] = (_same(p + hf), [p + hf])
            entries[("eh_proj", "kernel")] = (_t(p + "eh_proj.weight"), [p + "eh_proj.weight"])
            groups.append((f"layer_{i:03d}", ("mtp", k), entries))
    return groups


def conversion_table(config: ModelConfig, names: set[str], with_mtp: bool) -> dict[tuple, tuple]:
    """Our flat model state path -> (reader, list of HF tensor names it reads).

    Built from :func:`layer_groups`: the layers of each stack are read and stacked on axis 0.
    """
    table: dict[tuple, tuple] = {}
    stacks: dict[tuple, list] = {}
    for _, prefix, entries in layer_groups(config, names, with_mtp):
        if prefix and prefix[0] in ("dense_layers", "moe_layers"):
            for rel, entry in entries.items():
                stacks.setdefault((prefix[0], *rel), []).append(entry)
        else:
            for rel, entry in entries.items():
                table[(*prefix, *rel)] = entry
    for path, entries in stacks.items():
        readers = [r for r, _ in entries]
        hf = [n for _, names_ in entries for n in names_]
        table[path] = (
            lambda get, readers=readers: stack_pieces(len(readers), lambda j: readers[j](get)),
            hf,
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
class HFCheckpoint:
    """An HF directory checked against its config from the safetensors headers (no tensor data).

    Attributes: path, hf_config (config.json dict), config (ModelConfig), files (SafetensorsDir),
    has_mtp (MTP modules are read), graphdef and flat (the abstract model's flat state: path ->
    Variable of a ShapeDtypeStruct, carrying its NamedSharding when opened with a mesh).
    """

    def __init__(self, path, hf_config, config, files, has_mtp, graphdef, flat):
        self.path, self.hf_config, self.config, self.files = path, hf_config, config, files
        self.has_mtp, self.graphdef, self.flat = has_mtp, graphdef, flat

    def groups(self):
        return layer_groups(self.config, self.files.names(), self.has_mtp)

    def table(self):
        return conversion_table(self.config, self.files.names(), self.has_mtp)


def open_hf_checkpoint(
    path: str | os.PathLike,
    dtype=jnp.float32,
    drop_mtp: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides,
) -> HFCheckpoint:
    """Opens an HF DeepSeek-V3 directory and checks every tensor name, shape and FP8 scale.

    Args:
      path: directory with config.json (``rope_scaling`` or ``rope_parameters`` form) and
        ``*.safetensors`` (one file or an index with shards), or its config.json.
      dtype: the model's parameter and computation dtype.
      drop_mtp: ignore MTP layers (num_hidden_layers + k) in the files.
      mesh: with a mesh, the abstract state (``flat``) carries each parameter's NamedSharding
        (the config's ``sharding_rules``, default ``sharding.DEFAULT_RULES``).
      config_overrides: ModelConfig implementation fields (``fp8_weights=True``: the FP8 model,
        whose ``*_scale_inv`` parameters come with their kernels, see :func:`read_fp8_kernel`).

    Raises:
      FileNotFoundError: no directory, no config.json, no safetensors, a shard named by the index
        missing.
      CheckpointError: a config.json or index that is not JSON, an index without a
        ``weight_map``, an invalid config field or unsupported quantization_config (the file
        named); a truncated or corrupt file; a tensor two files both supply (see
        :class:`SafetensorsDir`); every missing, unexpected and mis-shaped tensor, every tensor of
        a non-float dtype (FP8 only on projection weights, scales float32/bf16), every FP8 tensor
        without a scale and every scale without a tensor, in one message.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no HF checkpoint directory at {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no HF config.json at {cfg_path}")
    hf_config = read_json(cfg_path)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object (got {type(hf_config).__name__})")
    dtype_name = config_dtype_name(dtype)
    try:
        block = quant_block_size(hf_config)
        config = ModelConfig.from_hf(
            hf_config, dtype=dtype_name, param_dtype=dtype_name, **config_overrides
        )
    except ValueError as err:  # CheckpointError included: name the file
        raise CheckpointError(f"{cfg_path}: {err}") from None
    files = SafetensorsDir(path, block)
    names = {n for n in files.names() if not n.endswith("rotary_emb.inv_freq")}  # old HF buffers
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    names -= scales
    mtp_prefixes = tuple(
        f"model.layers.{config.num_hidden_layers + k}."
        for k in range(config.num_nextn_predict_layers)
    )
    in_files = bool(mtp_prefixes) and any(n.startswith(mtp_prefixes) for n in names)
    has_mtp = in_files and not drop_mtp
    if config.num_nextn_predict_layers and not in_files:
        log.warning(
            "%s: config counts %d MTP layer(s) but the files hold no MTP tensors "
            "(transformers does not save them); loading the main model without MTP.",
            path,
            config.num_nextn_predict_layers,
        )
    graphdef, abstract_state = abstract_model(config, has_mtp, mesh)
    flat = dict(nnx.to_flat_state(abstract_state))
    table = conversion_table(config, names, has_mtp)

    # Check everything before reading any data.
    wanted = {n for _, hf in table.values() for n in hf}
    ignored = mtp_copies(config) if has_mtp else set()
    if drop_mtp and mtp_prefixes:
        ignored |= {n for n in names if n.startswith(mtp_prefixes)}
        scales = {s for s in scales if not s.startswith(mtp_prefixes)}
    missing = sorted(wanted - names)
    unexpected = sorted(names - wanted - ignored)
    scales = set(fp8_scale_paths(flat).values())  # FP8 model: read with their kernels
    unmapped = sorted(".".join(map(str, p)) for p in flat if p not in table and p not in scales)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if unmapped:
        problems.append(f"model parameters with no checkpoint source: {unmapped}")
    complete = {p: e for p, e in table.items() if all(n in names for n in e[1])}
    problems += _shape_problems(complete, flat, files)
    problems += files.fp8_problems(ignore=mtp_prefixes if drop_mtp else ())
    problems += files.dtype_problems(ignore=mtp_prefixes if drop_mtp else ())
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit its config:\n  " + "\n  ".join(problems)
        )
    return HFCheckpoint(path, hf_config, config, files, has_mtp, graphdef, flat)


def load_hf_checkpoint(
    path: str | os.PathLike,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    fp8: bool = False,
    **config_overrides,
) -> DeepseekV3:
    """Loads an HF DeepSeek-V3 directory (config.json + safetensors) into the model.

    Args:
      path: directory with config.json and ``model.safetensors`` or a
        ``model.safetensors.index.json`` with shards (HF per-expert or fused expert names); float32,
        bf16, fp16 or official block-FP8 weights (dequantized with their ``*_scale_inv``).
      dtype: parameter and computation dtype (the router and correction bias stay float32).
      mesh: None: every array on the default device (each HF tensor read whole). A mesh (e.g.
        ``sharding.make_mesh({"fsdp": 2, "tensor": 4})``): each parameter and correction bias
        is placed with the NamedSharding its logical names map to under the rules, shard by
        shard: every distinct shard of this process's devices is read from the files as a
        slice (``safe_open(...).get_slice(name)[rows, cols]``: HF weights transposed, stacks
        of layers and experts read per HF tensor, FP8 blocks dequantized for the slice only),
        so a process holds its own shards of the array being built (plus one HF piece while a
        stack fills), never the whole model.
      rules: a sharding rules table (``(logical name, mesh axes)`` pairs, see
        ``sharding.DEFAULT_RULES``), kept as ``model.config.sharding_rules`` so the activation
        constraints follow it too. Default: the ``sharding_rules`` override, else the default.
      fp8: FP8 inference: the model is built with ``fp8_weights=True`` (every projection of
        attention, dense MLP, shared and routed experts and MTP's eh_proj a float8_e4m3fn kernel
        [in, out] with a float32 ``*_scale_inv`` [ceil(in/128), ceil(out/128)], run as an FP8
        GEMM; embedding, head, router and norms in ``dtype``) and the official FP8 weights stay
        FP8: their bytes are transposed (and stacked) as bytes and their scale grids transposed,
        never dequantized (no float copy of an FP8 weight, on the host or a device). A weight
        stored in float where the model wants FP8 (a bf16 checkpoint; the official eh_proj,
        which is bf16) or in other blocks than 128 x 128 is quantized on load
        (``fp8.quantize_np``: 128 x 128 blocks, scale = amax / 448). Works with ``mesh``.
      config_overrides: ModelConfig implementation fields (e.g. ``remat=True``).

    Returns:
      DeepseekV3. Without MTP tensors in the files (transformers does not save them) the model has
      no MTP modules, and a warning says so once. Placed on ``mesh``, it runs sharded when called.

    Raises:
      FileNotFoundError: no config.json, no safetensors, or a shard named by the index missing.
      CheckpointError: see :func:`open_hf_checkpoint`.
      ValueError: a bad rules table, or ``rules`` and a different ``sharding_rules`` override.
    """
    if fp8:
        config_overrides = {**config_overrides, "fp8_weights": True, "fp8_training": False}
    ck = open_hf_checkpoint(path, dtype, mesh=mesh, **with_rules(config_overrides, rules))
    flat, files = ck.flat, ck.files
    scale_of = fp8_scale_paths(flat)  # FP8 model: kernel path -> its scale's
    # The router and correction bias are float32 in the model whatever ``dtype`` is.
    leaf = lambda name: _Leaf(files, name)  # noqa: E731
    values = {}
    for p, (reader, hf) in ck.table().items():
        target = flat[p].get_value()  # ShapeDtypeStruct (with its NamedSharding on a mesh)
        if p in scale_of:
            s = scale_of[p]
            if mesh is None:
                values[p], values[s] = map(jnp.asarray, read_fp8_kernel(files, reader, hf))
            else:
                values[p], values[s] = read_fp8_kernel_sharded(
                    files, reader, hf, target, flat[s].get_value()
                )
        elif mesh is None:
            values[p] = jnp.asarray(reader(files.read), target.dtype)
        else:
            values[p] = read_sharded(reader(leaf), target.shape, target.dtype, target.sharding)
    files.close()
    state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
    return nnx.merge(ck.graphdef, state)


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
