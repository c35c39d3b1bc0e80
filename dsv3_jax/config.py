"""ModelConfig: one frozen dataclass with the HF ``config.json`` field names of DeepSeek-V3.

Built from Python (``configs/*.py``) or from an HF ``config.json`` with :meth:`ModelConfig.from_hf`,
which reads both the official checkpoint's ``rope_scaling`` and transformers 5.x's
``rope_parameters``. Every instance validates itself and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

_ROPE_TYPES = ("default", "yarn")
REMAT_NAMES = ("none", "full", "minimal", "save_dots")  # ModelConfig.remat (True/False: full/none)
_MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi K2 ships the DeepSeek-V3 architecture
# ModelConfig fields that steer this implementation only: not in config.json, free to change
# between training and sampling of the same weights.
IMPLEMENTATION_FIELDS = (
    "dtype", "param_dtype", "remat", "moe_impl", "moe_dispatch", "moe_capacity_factor",
    "mla_decode", "attention_kernel", "sharding_rules", "fp8_training", "fp8_weights",
    "fp8_kernel",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` of the official config.json; DeepSeek-V2 report App. B).

    ``factor`` None means max_position_embeddings / original_max_position_embeddings (as HF does).
    ``attention_factor`` None means HF's rule: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are set, else mscale(factor, 1); it multiplies cos and sin.
    """

    rope_type: str = "yarn"
    factor: float | None = None
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_dict(cls, d: Any, *, strict: bool = True) -> RopeScaling | None:
        """YaRN parameters from the mapping form config.json uses (or a ConfigDict).

        Reads ``type`` (official ``rope_scaling``) or ``rope_type`` (transformers 5.x
        ``rope_parameters``); ``rope_theta`` inside the mapping is ignored here (it is
        ``ModelConfig.rope_theta``). A type of ``"default"`` (plain RoPE) gives None.

        Args:
          d: a Mapping, ``ml_collections.ConfigDict`` or a ``RopeScaling`` (returned as is).
          strict: reject keys that are not RopeScaling fields (False: ignore them, as for a
            config.json written by other tools).

        Raises:
          TypeError: ``d`` is not a mapping.
          ValueError: an unknown key (strict), naming it.
        """
        if isinstance(d, RopeScaling):
            return d
        raw = _as_dict(d, "ModelConfig.rope_scaling")
        raw.pop("rope_theta", None)
        rope_type = raw.pop("rope_type", None) or raw.pop("type", None) or "default"
        raw.pop("type", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        unknown = sorted(set(raw) - known)
        if unknown and strict:
            raise ValueError(
                f"ModelConfig.rope_scaling has unknown keys {unknown}; known: 'type' or "
                f"'rope_type', {', '.join(repr(k) for k in sorted(known))}"
            )
        if rope_type == "default":
            return None
        return cls(rope_type=rope_type, **{k: v for k, v in raw.items() if k in known})


def dtype_name(value: Any, name: str = "dtype") -> str:
    """A model dtype's name ("float32", "bfloat16" or "float16") from a name, numpy or jnp dtype.

    Raises:
      ValueError: naming ``name``, for anything else (e.g. "fp32", "float8", 3).
    """
    try:
        result = value if isinstance(value, str) else np.dtype(value).name
    except TypeError:
        result = None
    if result not in _MODEL_DTYPES:
        raise ValueError(f"{name} must be one of {_MODEL_DTYPES}, got {value!r}")
    return result


_MODEL_DTYPES = ("float32", "bfloat16", "float16")


def _check_positive_number(name: str, value: Any, allow_zero: bool = False) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite real number > 0 (>= 0)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    """A plain dict from a Mapping or an ``ml_collections.ConfigDict`` (nested values kept)."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):  # ConfigDict, FrozenConfigDict
        return {k: value[k] for k in value.keys()}
    raise TypeError(f"{name} must be a mapping of fields, got {type(value).__name__}: {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 hyper-parameters, named as in the official/HF ``config.json``.

    Defaults are the 671B model (report section 4.2 and the checkpoint's config.json). Non-HF fields
    (``IMPLEMENTATION_FIELDS``: dtypes, remat, kernel choices) only steer this implementation.

    Raises:
      ValueError: naming the field, for any inconsistent or unsupported value (see ``validate``).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 3
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = RopeScaling(
        factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
    )
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.006
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Implementation knobs (not in config.json).
    dtype: str = "float32"  # computation dtype: "float32" for parity, "bfloat16" for training
    param_dtype: str = "float32"
    # Rematerialisation of each decoder layer in the backward pass (dsv3_jax.model.REMAT_POLICIES):
    # "none" (keep every activation), "full" (keep the layer's input only, recompute the rest),
    # "minimal" (report 3.2.3: keep the down-projection outputs q_a and kv_a (latent c_KV, k_R),
    # the attention output and the SwiGLU inputs; recompute RMSNorms, MLA up-projections, SwiGLU)
    # or "save_dots" (keep every matmul output without a batch dimension). True/False: full/none.
    remat: str = "none"
    moe_impl: str = "auto"  # grouped matmul: "ragged" (lax.ragged_dot), "blocked" (CPU), "auto"
    # How routed tokens reach their experts on a mesh (dsv3_jax.moe): "gspmd" (one global sort,
    # XLA partitions it; the reference), "all_to_all" (shard_map over the expert axis with
    # capacity-padded lax.all_to_all), "ragged_all_to_all" (exact-size lax.ragged_all_to_all;
    # GPU/TPU only) or "auto" (all_to_all when the mesh's expert axis is larger than 1 and splits
    # the batch, else gspmd).
    moe_dispatch: str = "auto"
    # all_to_all rows per peer: ceil(factor * tokens * k / ep); None: the worst case (dropless, as
    # DeepSeek-V3 trains). Assignments over capacity are dropped and counted (aux "dropped").
    # Used by the all_to_all dispatch only (gspmd and ragged_all_to_all never drop); generate()
    # always samples dropless.
    moe_capacity_factor: float | None = None
    # Attention over the latent cache (decode, speculative verification): "absorbed" folds kv_b
    # into the query and the output (multi-query attention over [c; r]); "naive" expands kv_b.
    mla_decode: str = "absorbed"
    # "reference" (jnp) or "pallas" (dsv3_jax.kernels: flash attention, latent decode attention).
    attention_kernel: str = "reference"
    # FP8 (report section 3.3; dsv3_jax.fp8). fp8_training: every linear except the embedding,
    # output head and router runs Fprop, Dgrad and Wgrad as block-scaled e4m3 GEMMs (master weights
    # in param_dtype). fp8_weights: kernels stored as float8_e4m3fn with 128x128 block scales
    # (``kernel_scale_inv``), as the official checkpoint ships them: inference only (load with
    # fp8=True). fp8_kernel: the GEMM, "reference" (jnp) or "pallas".
    fp8_training: bool = False
    fp8_weights: bool = False
    fp8_kernel: str = "reference"
    # Logical axis name -> mesh axes (dsv3_jax.sharding); None: sharding.DEFAULT_RULES. Set by
    # sharding.shard_model and the loaders' rules= argument; used only under a multi-device mesh.
    sharding_rules: tuple | None = None

    def __post_init__(self):
        if self.sharding_rules is not None:  # JSON gives lists: back to the tuple table
            from dsv3_jax.sharding import check_rules  # noqa: PLC0415

            object.__setattr__(self, "sharding_rules", check_rules(self.sharding_rules))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            # The dict form config.json uses: {"type": "yarn", "factor": 40, ...}.
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        remat = {"true": True, "false": False}.get(str(self.remat).lower(), self.remat)
        if isinstance(remat, bool):  # saved configs, --remat=true|false, --config.model.remat=True
            object.__setattr__(self, "remat", "full" if remat else "none")
        for name in ("dtype", "param_dtype"):  # accept jnp.bfloat16, np.dtype, "bfloat16" alike
            value = getattr(self, name)
            if not isinstance(value, str):
                try:
                    object.__setattr__(self, name, np.dtype(value).name)
                except TypeError:
                    pass  # validate() names the field
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def replace(self, **kwargs) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in (
            "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative int, got {value!r}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            raise ValueError(
                f"ModelConfig.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}"
            )
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
            _check_positive_number(f"ModelConfig.{name}", getattr(self, name))
        for name in ("norm_topk_prob", "rope_interleave", "tie_word_embeddings",
                     "attention_bias"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"ModelConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"ModelConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= topk_group * "
                f"n_routed_experts / n_group = {self.topk_group * per_group}"
            )
        if self.n_group > 1 and per_group < 2:
            raise ValueError(
                f"ModelConfig.n_group ({self.n_group}) leaves fewer than 2 experts per group; "
                "group scores sum each group's top-2 experts"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"ModelConfig.first_k_dense_replace ({self.first_k_dense_replace}) must be <= "
                f"num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.scoring_func != "sigmoid":
            raise ValueError(
                f"ModelConfig.scoring_func {self.scoring_func!r} is not supported (only 'sigmoid', "
                "DeepSeek-V3)"
            )
        if self.topk_method != "noaux_tc":
            raise ValueError(
                f"ModelConfig.topk_method {self.topk_method!r} is not supported (only 'noaux_tc', "
                "DeepSeek-V3)"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"ModelConfig.hidden_act {self.hidden_act!r} is not supported (only 'silu')"
            )
        if self.attention_bias:
            raise ValueError(
                "ModelConfig.attention_bias=True is not supported (DeepSeek-V3 has none)"
            )
        if self.tie_word_embeddings:
            raise ValueError("ModelConfig.tie_word_embeddings=True is not supported (V3 is untied)")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"ModelConfig.rope_scaling.rope_type {rs.rope_type!r} is unknown; supported: "
                    f"{_ROPE_TYPES}"
                )
            for name in ("factor", "beta_fast", "beta_slow", "attention_factor"):
                if getattr(rs, name) is not None:
                    _check_positive_number(f"ModelConfig.rope_scaling.{name}", getattr(rs, name))
            for name in ("mscale", "mscale_all_dim"):  # 0 or None: not applied (as HF)
                if getattr(rs, name) is not None:
                    _check_positive_number(
                        f"ModelConfig.rope_scaling.{name}", getattr(rs, name), allow_zero=True
                    )
            omax = rs.original_max_position_embeddings
            if not isinstance(omax, int) or isinstance(omax, bool) or omax <= 0:
                raise ValueError(
                    "ModelConfig.rope_scaling.original_max_position_embeddings must be > 0, got "
                    f"{rs.original_max_position_embeddings!r}"
                )
        if self.moe_impl not in ("auto", "ragged", "blocked"):
            raise ValueError(
                f"ModelConfig.moe_impl must be 'auto', 'ragged' or 'blocked', got {self.moe_impl!r}"
            )
        if self.moe_capacity_factor is not None:
            _check_positive_number("ModelConfig.moe_capacity_factor", self.moe_capacity_factor)
        for name, allowed in (
            ("moe_dispatch", ("auto", "gspmd", "all_to_all", "ragged_all_to_all")),
            ("mla_decode", ("absorbed", "naive")),
            ("attention_kernel", ("reference", "pallas")),
            ("fp8_kernel", ("reference", "pallas")),
            ("remat", REMAT_NAMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("fp8_training", "fp8_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.fp8_training and self.fp8_weights:
            raise ValueError(
                "ModelConfig.fp8_weights (frozen FP8 weights, inference) cannot be combined with "
                "fp8_training (FP8 GEMMs over float master weights)"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"ModelConfig.{name} must be 'float32', 'bfloat16' or 'float16', "
                    f"got {getattr(self, name)!r}"
                )

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(
        cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
    ) -> ModelConfig:
        """Builds a config from an HF ``config.json`` (a path, its directory, or the parsed dict).

        Reads ``rope_scaling`` (official checkpoint; ``type`` or ``rope_type``) and transformers 5.x
        ``rope_parameters`` (``rope_type``, ``rope_theta`` inside). Unknown keys are ignored;
        ``overrides`` set implementation fields (e.g. ``dtype="bfloat16"``).

        Raises:
          FileNotFoundError: no config.json at the path.
          ValueError: an unsupported or inconsistent field (named in the message).
        """
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no HF config.json at {path}")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} is not valid JSON: {err}") from None
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"config.json model_type {model_type!r} is not a DeepSeek-V3 architecture "
                f"(supported: {_MODEL_TYPES})"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling"}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        rope = raw.get("rope_parameters") or raw.get("rope_scaling")
        if rope is not None and not isinstance(rope, Mapping):
            raise ValueError(f"ModelConfig.rope_scaling must be a mapping, got {rope!r}")
        if rope and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        kwargs["rope_scaling"] = RopeScaling.from_dict(rope or {}, strict=False)
        for key in ("rope_interleave",):
            if raw.get(key) is None:
                kwargs.pop(key, None)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The config as an official-style HF ``config.json`` dict (``rope_scaling`` form)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "rope_scaling" and f.name not in IMPLEMENTATION_FIELDS
        }
        if self.rope_scaling is None:
            out["rope_scaling"] = None
        else:
            rs = dataclasses.asdict(self.rope_scaling)
            rs["type"] = rs.pop("rope_type")
            out["rope_scaling"] = {k: v for k, v in rs.items() if v is not None}
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        """All fields (implementation knobs included), JSON-serialisable; inverse of from_dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """A config from a mapping of its fields: ``to_dict()``'s output, a ``configs/*.py``
        ``get_config().model`` (an ``ml_collections.ConfigDict``) or a plain dict.

        ``rope_scaling`` may be a RopeScaling, None, or the mapping form config.json uses.

        Raises:
          TypeError: ``d`` is not a mapping.
          ValueError: a key that is not a ModelConfig field (named, with the closest field), or
            any value ``validate`` rejects.
        """
        d = _as_dict(d, "ModelConfig.from_dict's argument")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, fields, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown ModelConfig fields: {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def coerce(cls, config: Any, name: str = "config") -> ModelConfig:
        """``config`` as a ModelConfig: returned as is, or built with :meth:`from_dict` from a
        mapping / ConfigDict of fields. The one conversion every public function applies.

        Raises:
          TypeError: ``config`` is neither a ModelConfig nor a mapping (names ``name``).
          ValueError: as :meth:`from_dict`.
        """
        if isinstance(config, cls):
            return config
        try:
            fields = _as_dict(config, name)
        except TypeError:
            raise TypeError(
                f"{name} must be a dsv3_jax.ModelConfig or a mapping of its fields (e.g. a "
                f"configs/*.py get_config().model), got {type(config).__name__}"
            ) from None
        return cls.from_dict(fields)
