"""The DeepSeek-V3 causal LM (V3 report section 2): decoder layers, layer scans, MTP, parameter counts.

Glossary: b batch, s positions, d hidden_size, w vocabulary, l layers (scan axis).

The first ``first_k_dense_replace`` layers (dense SwiGLU) and the remaining MoE layers are two
stacks of identical layers, each created with ``nnx.vmap`` (logical axis ``layers`` first) and run
with ``jax.lax.scan``, so 61 layers compile as two bodies.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import sharding
from dsv3_jax.config import IMPLEMENTATION_FIELDS, ModelConfig
from dsv3_jax.layers import MLP, Embed, Linear, RMSNorm
from dsv3_jax.mla import MLA, LatentCache, init_cache
from dsv3_jax.moe import MoE
from dsv3_jax.sharding import constrain, use_mesh_of

TOKENS = ("batch", "seq", "act_embed")  # hidden states [b, s, d] between blocks
LOGITS = ("batch", "seq", "act_vocab")
STACKED_CACHE = ("layers", "batch", "cache_seq", "cache_latent")


class DecoderLayer(nnx.Module):
    """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h)) with FFN dense SwiGLU or DeepSeekMoE."""

    def __init__(self, config: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, "embed", config)
        self.self_attn = MLA(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, "embed", config)
        self.mlp = (
            MoE(config, rngs=rngs) if moe else MLP(config, config.intermediate_size, rngs=rngs)
        )

    def __call__(self, h, positions, cache: LatentCache | None = None, prefill: bool = False):
        """h [b, s, d] -> (h [b, s, d], aux (MoE: load, balance, experts; see MoE), cache)."""
        attn, cache = self.self_attn(self.input_layernorm(h), positions, cache, prefill=prefill)
        h = h + attn
        ffn = self.mlp(self.post_attention_layernorm(h))
        ffn, aux = ffn if isinstance(ffn, tuple) else (ffn, {})
        return h + ffn, aux, cache


def _stack(config: ModelConfig, moe: bool, n: int, rngs: nnx.Rngs) -> DecoderLayer:
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, moe, rngs=r)

    return create(rngs.split(n))


# ModelConfig.remat -> what each layer keeps for the backward pass (jax.checkpoint policies).
# The names are jax.ad_checkpoint.checkpoint_name tags in mla.py, layers.py and moe.py.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Report 3.2.3: recompute RMSNorm and the MLA up-projections; keep the compressed latents
    # (q_a; kv_a = c_KV and k_R before their norm), the attention output and the SwiGLU inputs
    # (report 3.3: SwiGLU is recomputed from its cached inputs).
    "minimal": jax.checkpoint_policies.save_only_these_names(
        "q_a", "kv_a", "attn_out", "mlp_gate", "mlp_up"
    ),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_stack(
    layers: DecoderLayer, h, positions, cache, remat: str, prefill: bool = False, rules=None
):
    """Scans ``h`` through a stack of layers; cache leaves carry a leading [l] axis.

    ``remat``: a ModelConfig.remat name ("none", or a key of REMAT_POLICIES).

    ``h`` is pinned to the batch sharding at each block boundary (``rules``: the sharding table);
    with FSDP, XLA gathers each layer's weight shards inside the body, one layer at a time.
    """
    graphdef, state = nnx.split(layers)

    def body(h, xs):
        layer_state, layer_cache = xs
        layer = nnx.merge(graphdef, layer_state)
        h, aux, layer_cache = layer(constrain(h, TOKENS, rules), positions, layer_cache, prefill)
        return constrain(h, TOKENS, rules), (aux, layer_cache)

    if remat in REMAT_POLICIES:
        body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[remat])
    h, (aux, cache) = jax.lax.scan(body, h, (state, cache))
    return h, aux, cache


class MTPModule(nnx.Module):
    """Multi-token prediction module k (V3 report section 2.2, eq. 21-23).

    h'_t = eh_proj([enorm(Emb(x_{t+k})) ; hnorm(h^{k-1}_t)])   (embedding first, as stored)
    h^k  = block(h');  logits = head(shared_head.norm(h^k)), with the main model's Emb and head.

    h^0 is the main model's last hidden state AFTER its final norm, as vLLM and SGLang feed the
    official MTP weights (the report leaves it open; the checkpoint was trained to be served so).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.enorm = RMSNorm(d, "embed", config)
        self.hnorm = RMSNorm(d, "embed", config)
        self.eh_proj = Linear(2 * d, d, ("mtp_concat", "embed"), config, rngs=rngs)
        self.block = DecoderLayer(
            config, moe=True, rngs=rngs
        )  # layer index >= first_k_dense_replace
        self.shared_head_norm = RMSNorm(d, "embed", config)

    def __call__(self, h_prev, emb_next, positions, cache=None, prefill: bool = False):
        """h_prev [b, s, d] and emb_next = Emb(x_{t+k}) [b, s, d] -> (h^k, aux, cache).

        ``cache`` (a LatentCache [b, t, .] of the block) and ``prefill`` are as in ``mla.MLA``.
        """
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1)  # [b, s, 2d]
        return self.block(self.eh_proj(x), positions, cache, prefill)


class ModelOutput(NamedTuple):
    logits: jax.Array  # float32 [b, s, w]
    hidden: jax.Array  # [b, s, d] after the final norm (h^0 of MTP)
    aux: dict  # per MoE layer: load [l, e], balance [l], experts int32 [l, b, s, k]
    cache: dict | None  # {"dense": LatentCache, "moe": LatentCache} with leading [l]


class DeepseekV3(nnx.Module):
    """DeepSeek-V3 for causal LM, with optional MTP modules.

    Args:
      config: the ModelConfig.
      rngs: parameter initialisation keys.
      mtp: build the ``num_nextn_predict_layers`` MTP modules (False: main model only).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mtp: bool = True):
        config = ModelConfig.coerce(config)
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        n_dense, n_moe = config.num_dense_layers, config.num_moe_layers
        self.dense_layers = _stack(config, False, n_dense, rngs) if n_dense else None
        self.moe_layers = _stack(config, True, n_moe, rngs) if n_moe else None
        self.norm = RMSNorm(config.hidden_size, "embed", config)
        self.lm_head = Linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), config, rngs=rngs,
            allow_fp8=False,
        )  # fmt: skip
        n_mtp = config.num_nextn_predict_layers if mtp else 0
        self.mtp = nnx.List([MTPModule(config, rngs=rngs) for _ in range(n_mtp)])

    @property
    def num_mtp(self) -> int:
        return len(self.mtp)

    # ------------------------------------------------------------------ public call
    def __call__(self, input_ids, *, return_mtp: bool = False):
        """Main logits of a batch of token ids.

        Args:
          input_ids: int [b, s], ids in [0, vocab_size).
          return_mtp: also return the MTP logits, a list over depths k = 1..D of float32
            [b, s - k, w] where row t predicts token t + k + 1 from tokens up to t + k.

        Returns:
          float32 [b, s, w] logits (and the MTP list when asked).

        Raises:
          ValueError: ids not int [b, s], or outside [0, vocab_size) (checked before compiling).
        """
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_position_embeddings)
        if return_mtp and not self.num_mtp:
            raise ValueError("this model has no MTP modules (loaded without MTP weights)")
        if return_mtp and np.shape(input_ids)[1] <= self.num_mtp:
            raise ValueError(
                f"return_mtp needs more than {self.num_mtp} tokens per row, got {input_ids.shape[1]}"
            )
        input_ids = jnp.asarray(input_ids)
        with use_mesh_of(self):  # a model placed on a mesh runs sharded
            out = self.forward(input_ids)
            if not return_mtp:
                return out.logits
            return out.logits, self.mtp_forward(input_ids, out.hidden)[0]

    def expert_choices(self, input_ids) -> jax.Array:
        """The routed experts each token goes to in each MoE layer of the main model.

        Args:
          input_ids: int [b, s], ids in [0, vocab_size).

        Returns:
          int32 [l, b, s, k] over the ``num_moe_layers`` MoE layers (layer
          ``first_k_dense_replace + i`` is row i): expert ids in [0, n_routed_experts) as
          ``moe.route`` picks them (group-limited top-k of s + b, highest first; V3 eqs. 12-16).

        Raises:
          ValueError: bad ids (as ``__call__``), or a model without MoE layers.
        """
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_position_embeddings)
        if self.moe_layers is None:
            raise ValueError("this model has no MoE layers (first_k_dense_replace >= layers)")
        with use_mesh_of(self):
            return self.forward(jnp.asarray(input_ids)).aux["experts"]

    # ------------------------------------------------------------------ jittable pieces
    def forward(
        self,
        input_ids,
        positions=None,
        cache: dict | None = None,
        *,
        prefill: bool = False,
        logits_index=None,
    ) -> ModelOutput:
        """Main model.

        Args:
          input_ids: int [b, s]. positions: int [b, s] (default 0..s-1).
          cache: optional latent cache from ``init_cache`` (its "mtp" entry is passed through).
          prefill: attend among the new tokens only (rows with an empty cache; see mla.MLA).
          logits_index: optional int [b]: compute logits only at this position of each row
            (then logits are [b, 1, w]; hidden stays [b, s, d]).
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(
                jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
            )
        h = self.embed_tokens(input_ids)  # [b, s, d]
        cache = cache or {}
        new_cache, aux = {}, {}
        for name, layers in (("dense", self.dense_layers), ("moe", self.moe_layers)):
            if layers is None:
                continue
            h, layer_aux, new_cache[name] = _run_stack(
                layers, h, positions, cache.get(name), cfg.remat, prefill, cfg.sharding_rules
            )
            if name == "moe":
                aux = layer_aux
        hidden = self.norm(h)
        head_in = hidden
        if logits_index is not None:
            head_in = jnp.take_along_axis(hidden, logits_index[:, None, None], axis=1)  # [b, 1, d]
        logits = self.lm_head(head_in, out_dtype=jnp.float32)  # [b, s, w]
        logits = constrain(logits, LOGITS, cfg.sharding_rules)
        if "mtp" in cache:
            new_cache["mtp"] = cache["mtp"]
        return ModelOutput(logits, hidden, aux, new_cache if cache else None)

    def mtp_forward(self, input_ids, hidden) -> tuple[list, list]:
        """MTP depths 1..D (training form, no cache).

        Args:
          input_ids: int [b, s] (the main model's inputs). hidden: [b, s, d] main hidden after norm.
        Returns:
          (logits list of float32 [b, s - k, w]; aux list of {load, balance, experts} as MoE's).
        """
        logits, auxes = [], []
        h, s = hidden, input_ids.shape[1]
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), input_ids.shape)
        for k, module in enumerate(self.mtp, start=1):
            h = h[:, : s - k]
            emb = self.embed_tokens(input_ids[:, k:])  # Emb(x_{t+k}) for t < s - k
            h, aux, _ = module(h, emb, positions[:, : s - k])
            logits.append(self._mtp_logits(module, h))
            auxes.append(aux)
        return logits, auxes

    def _mtp_logits(self, module: MTPModule, h):
        return self.lm_head(module.shared_head_norm(h), out_dtype=jnp.float32)

    def mtp_step(
        self, hidden, next_ids, positions, cache: dict, *, prefill: bool = False, logits_index=None
    ):
        """The first MTP module over a cache, for drafting (speculative decoding).

        Args:
          hidden: [b, s, d] main-model hidden states (after the final norm) at ``positions``.
          next_ids: int [b, s]: the token at position + 1 of each row.
          positions: int32 [b, s]; cache: from ``init_cache(..., mtp=True)``; prefill as in forward.
          logits_index: optional int [b]: logits only at this index of each row ([b, 1, w]).

        Returns:
          (float32 logits [b, s, w] predicting the token at position + 2, the updated cache).
        """
        module = self.mtp[0]
        h, _, mtp_cache = module(
            hidden, self.embed_tokens(next_ids), positions, cache["mtp"], prefill
        )
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)  # [b, 1, d]
        return self._mtp_logits(module, h), {**cache, "mtp": mtp_cache}

    def init_cache(self, batch: int, max_len: int, dtype=None, *, mtp: bool = False) -> dict:
        """Empty latent cache for every layer (see mla.LatentCache); ``mtp`` adds module 1's."""
        cfg = self.config
        cache = {}
        pin = lambda c: LatentCache(*(constrain(x, STACKED_CACHE, cfg.sharding_rules) for x in c))  # noqa: E731
        if mtp:
            if not self.num_mtp:
                raise ValueError("this model has no MTP modules (loaded without MTP weights)")
            one = init_cache(cfg, 1, batch, max_len, dtype)
            cache["mtp"] = LatentCache(one.c_kv[0], one.k_rope[0])
        if cfg.num_dense_layers:
            cache["dense"] = pin(init_cache(cfg, cfg.num_dense_layers, batch, max_len, dtype))
        if cfg.num_moe_layers:
            cache["moe"] = pin(init_cache(cfg, cfg.num_moe_layers, batch, max_len, dtype))
        return cache


def with_implementation(model: DeepseekV3, **changes) -> DeepseekV3:
    """Switches implementation settings of a built model, in place, for every layer.

    The settings are ``config.IMPLEMENTATION_FIELDS`` of the one ModelConfig that every module
    keeps and reads when called (``dtype``: computation dtype of every layer, embedding, norms
    and output head included; ``attention_kernel``; ``mla_decode``; ``moe_impl``; ``remat``), so
    replacing it here changes the whole model. ``param_dtype`` casts the stored weights (the
    router kernel and the correction biases stay float32, as they are built).

    Args:
      model: a built or loaded DeepseekV3.
      **changes: implementation fields and their new values (validated as ModelConfig does).

    Returns:
      The same model.

    Raises:
      ValueError: a field that is not an implementation field (it would change the
        architecture), or a value ModelConfig rejects (naming the field).
    """
    from dsv3_jax.moe import Router  # noqa: PLC0415 (moe imports layers; model imports both)

    if not isinstance(model, DeepseekV3):
        raise TypeError(f"with_implementation takes a DeepseekV3 model, got {type(model).__name__}")
    bad = sorted(set(changes) - set(IMPLEMENTATION_FIELDS))
    if "fp8_weights" in changes and changes["fp8_weights"] != model.config.fp8_weights:
        raise ValueError(
            "fp8_weights changes how the weights are stored: load the checkpoint with fp8=True "
            "(or without) instead of switching a built model"
        )
    if bad:
        raise ValueError(
            f"only implementation fields {IMPLEMENTATION_FIELDS} can change, got {bad}"
        )
    old = model.config
    config = old.replace(**changes)
    param_dtype = jnp.dtype(config.param_dtype)
    cast = config.param_dtype != old.param_dtype
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        if isinstance(getattr(node, "config", None), ModelConfig):
            node.config = config
        if cast and not isinstance(node, Router):
            for var in vars(node).values():
                if isinstance(var, nnx.Param) and not _is_fp8(var):
                    var.set_value(var.get_value().astype(param_dtype))
    return model


def _is_fp8(var: nnx.Variable) -> bool:
    """FP8 values and their scales keep their dtypes when param_dtype changes."""
    from dsv3_jax.layers import ScaleInv  # noqa: PLC0415

    return isinstance(var, ScaleInv) or var.get_value().dtype == jnp.float8_e4m3fn


def abstract_model(
    config: ModelConfig, mtp: bool = True, mesh: jax.sharding.Mesh | None = None, rules=None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of ``DeepseekV3(config, mtp=mtp)`` without allocating it.

    The one abstract model every loader builds (safetensors reader, orbax restores).

    Args:
      config: the ModelConfig. mtp: build its MTP modules.
      mesh: None: each leaf a ``jax.ShapeDtypeStruct`` (shape, dtype); a mesh: each also carries
        the NamedSharding the rules give its logical names (see ``sharding.abstract_model``).
      rules: a sharding rules table; default ``config.sharding_rules`` (None: DEFAULT_RULES).

    Returns:
      (graphdef, state) with the model's paths, Variable types and ``out_sharding`` metadata;
      ``nnx.merge(graphdef, state_with_arrays)`` makes the model.
    """
    rules = config.sharding_rules if rules is None else rules
    return sharding.abstract_model(
        lambda: DeepseekV3(config, rngs=nnx.Rngs(0), mtp=mtp), mesh, rules
    )


def init_model(
    config: ModelConfig,
    seed: int = 0,
    *,
    mtp: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> DeepseekV3:
    """A freshly initialised model; on a mesh, each parameter is created in its shards.

    Equal to ``DeepseekV3(config, rngs=nnx.Rngs(seed), mtp=mtp)`` (same values). With a mesh the
    initialiser runs as one jitted program whose outputs have the shardings the rules give, so no
    device (or host) ever holds a whole parameter it does not own.

    Args:
      config: a ModelConfig or a mapping of its fields. seed: the parameter seed.
      mtp: build the MTP modules. mesh: a ``make_mesh`` mesh (None: the default device).
      rules: a sharding rules table (default ``config.sharding_rules``; None: DEFAULT_RULES); it
        is kept in the model's config for the activation constraints.

    Raises:
      TypeError / ValueError: as ``ModelConfig.coerce``; a bad rules table (named entry); or
        ``rules`` differing from a table already in ``config.sharding_rules``.
    """
    config = ModelConfig.coerce(config)
    kept = {} if config.sharding_rules is None else {"sharding_rules": config.sharding_rules}
    config = config.replace(**with_rules(kept, rules))
    if mesh is None:
        return DeepseekV3(config, rngs=nnx.Rngs(seed), mtp=mtp)
    graphdef, abstract = abstract_model(config, mtp, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)

    def build():
        return nnx.split(DeepseekV3(config, rngs=nnx.Rngs(seed), mtp=mtp))[1]

    with sharding.no_mesh():  # placed by out_shardings (the rules), not by flax
        state = jax.jit(build, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def with_rules(config_overrides: dict, rules) -> dict:
    """``config_overrides`` with ``sharding_rules`` set from a loader's ``rules=`` argument.

    None leaves them as they are; the default table is stored as None (as ``shard_model`` does).

    Raises:
      ValueError: a bad rules table (named entry), or ``rules`` and a different
        ``sharding_rules`` override both given.
    """
    if rules is None:
        return config_overrides
    rules, default = sharding.check_rules(rules), sharding.check_rules(sharding.DEFAULT_RULES)
    stored = None if rules == default else rules
    if "sharding_rules" in config_overrides:
        given = config_overrides["sharding_rules"]
        if (default if given is None else sharding.check_rules(given)) != rules:
            raise ValueError("rules= and sharding_rules= name different tables; pass one")
    return {**config_overrides, "sharding_rules": stored}


def check_input_ids(input_ids, vocab_size: int, max_len: int | None = None) -> None:
    """Raises ValueError unless ids are int [b, s], 1 <= s <= max_len, in [0, vocab_size).

    Skipped under tracing (the values are unknown there).
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"input_ids must be an int array [batch, seq], got {ids.dtype} {ids.shape}"
        )
    if ids.shape[0] < 1:
        raise ValueError(f"input_ids holds no rows (batch of 0), got shape {ids.shape}")
    if ids.shape[1] < 1 or (max_len is not None and ids.shape[1] > max_len):
        raise ValueError(
            f"input_ids length {ids.shape[1]} is outside [1, max_position_embeddings={max_len}]"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = np.unique(ids[(ids < 0) | (ids >= vocab_size)])[:10]
        raise ValueError(f"input_ids outside [0, vocab_size={vocab_size}): {bad.tolist()}")


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, activated per token) parameters of the main model, from abstract shapes.

    MTP modules are not counted (they add about 11.5B for V3). Activated = total minus the routed
    experts a token does not use: (n_routed_experts - num_experts_per_tok) / n_routed_experts of
    each MoE layer's routed-expert weights. The correction bias is a buffer, not a parameter.
    For the 671B config: about 671B total and 37B activated (V3 report, section 1).

    Args:
      config: a ModelConfig, or a mapping / ConfigDict of its fields (``ModelConfig.coerce``).

    Raises:
      TypeError: ``config`` is neither. ValueError: a bad field, named.
    """
    config = ModelConfig.coerce(config)
    abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0), mtp=False))
    params = nnx.state(abstract, nnx.Param)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))  # Python ints: no overflow
    moe = params["moe_layers"]["mlp"] if config.num_moe_layers else None
    routed = 0
    if moe is not None:
        routed = sum(math.prod(moe[n].shape) for n in ("gate_proj", "up_proj", "down_proj"))
    inactive = (
        routed * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
    )
    return total, total - inactive
