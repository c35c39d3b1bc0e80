#!/usr/bin/env python
"""Generate HF-transformers parity goldens for dsv3_jax.

Run with the HF reference venv (Python 3.11, CPU torch, transformers, safetensors, numpy):

    make goldens            # == .venv-hf/bin/python tests/goldens/make_goldens.py

For each tiny random DeepSeek-V3 config below this writes tests/goldens/<name>/ holding
  * the checkpoint exactly as `DeepseekV3ForCausalLM.save_pretrained` writes it (config.json,
    generation_config.json, model.safetensors or several shards + model.safetensors.index.json);
  * golden.npz: input_ids [2,13] int32, logits [2,13,V] float32 (plain forward, no cache),
    prompt_ids [1,5] int32, greedy_ids [1,37] int32 (generate(), KV cache, 32 new tokens) and
    greedy_margin [32] float32 (top-1 minus top-2 raw logit at each generated step).
Some directories are post-processed (see POST-PROCESSING in README.md): one config.json is rewritten
into the official DeepSeek-V3 `rope_scaling` form and one directory gets an extra mtp.safetensors.

Deterministic (fixed seeds, float32, eager attention, single thread) and fast (a few seconds).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)  # bitwise-reproducible CPU reductions

OUT = Path(__file__).resolve().parent
SEQ = 13
PROMPT = 5
NEW = 32
MAX_DIR_BYTES = 300_000

# Common tiny-model defaults; each golden overrides what it covers.
BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    num_nextn_predict_layers=0,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    attention_bias=False,
)


def yarn(theta, factor, orig, mscale, mscale_all_dim, beta_fast=32.0, beta_slow=1.0):
    return dict(
        rope_type="yarn",
        rope_theta=float(theta),
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=float(beta_fast),
        beta_slow=float(beta_slow),
        mscale=float(mscale),
        mscale_all_dim=float(mscale_all_dim),
    )


GOLDENS = [
    dict(
        name="a_qlora_yarn_sharded_mtp",
        doc="q_lora_rank, YaRN (factor 4, L0 16, mscale = mscale_all_dim = 1), first_k_dense_replace 1, "
        "1 shared expert, norm_topk_prob, n_group 1, 2 layers, MTP layer 1 with extra mtp.safetensors "
        "(official names at layer index 2, listed in the index's weight_map), sharded checkpoint",
        cfg=dict(
            vocab_size=96,
            num_hidden_layers=2,
            rope_parameters=yarn(10000, 4, 16, 1.0, 1.0),
            max_position_embeddings=64,
            num_nextn_predict_layers=1,
        ),
        shard="40KB",
        mtp=True,
    ),
    dict(
        name="b_qproj_vdim_dense2_nonorm",
        doc="q_proj (q_lora_rank None), v_head_dim 24 != qk_nope_head_dim 16, rope 16, default RoPE with "
        "rope_theta 5000, first_k_dense_replace 2, 2 shared experts, norm_topk_prob False with "
        "routed_scaling_factor 2.5, 4 experts, 3 heads",
        cfg=dict(
            vocab_size=160,
            num_attention_heads=3,
            num_key_value_heads=3,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=24,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=2,
            n_shared_experts=2,
            norm_topk_prob=False,
            routed_scaling_factor=2.5,
            rope_parameters=dict(rope_type="default", rope_theta=5000.0),
        ),
    ),
    dict(
        name="c_grouped_negbias",
        doc="n_group 4 (2 experts each), topk_group 2, num_experts_per_tok 3, correction bias uniform in "
        "[-3, -2] so every biased score is < 0 (dropped groups must be -inf, not 0), q_lora_rank 16, "
        "default RoPE, MTP layers 1 in config (no MTP weights)",
        cfg=dict(
            vocab_size=96,
            intermediate_size=48,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=8,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=1,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        bias=("uniform", -3.0, -2.0),
    ),
    dict(
        name="d_yarn_mscale_official_cfg",
        doc="YaRN factor 4 with L0 1024 (correction range low 1 / high 5: base, ramp and interpolated "
        "frequencies all present), mscale 0.707 != mscale_all_dim 1.0 (cos/sin attention_factor != 1), "
        "q_proj, v_head_dim 8 != qk_nope_head_dim 16, rope 16, 2 shared experts, 6 experts in 2 groups "
        "(topk_group 1), routed_scaling_factor 1.5; config.json rewritten to the official "
        "rope_scaling + rope_theta form",
        cfg=dict(
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=8,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            rope_parameters=yarn(10000, 4, 1024, 0.707, 1.0),
            max_position_embeddings=4096,
        ),
        official_cfg=True,
    ),
    dict(
        name="e_no_interleave",
        doc="rope_interleave False (HF rotate_half on q/k rope dims as stored), hidden 40, q_lora_rank 20, "
        "rope 16, v_head_dim 12 != nope 8, first_k_dense_replace 2, 4 experts in 2 groups (topk_group 1), "
        "moe_intermediate_size 24",
        cfg=dict(
            vocab_size=112,
            hidden_size=40,
            intermediate_size=56,
            moe_intermediate_size=24,
            q_lora_rank=20,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=16,
            v_head_dim=12,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=2,
            rope_interleave=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    dict(
        name="f_v3_like",
        doc="V3-shaped: q_lora_rank, nope = 2 x rope, v = nope, YaRN factor 4 L0 16 with mscale 0.707 / "
        "mscale_all_dim 1.0, 8 experts in 4 groups, topk_group 2, 4 experts per token, 1 shared, "
        "norm_topk_prob, routed_scaling_factor 2.5, 4 layers (first_k_dense_replace 1), MTP layers 1 in "
        "config (no MTP weights)",
        cfg=dict(
            num_hidden_layers=4,
            moe_intermediate_size=12,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            rope_parameters=yarn(10000, 4, 16, 0.707, 1.0),
            max_position_embeddings=64,
        ),
    ),
    dict(
        name="g_all_moe_bf16",
        doc="first_k_dense_replace 0 (every layer MoE), weights stored in bfloat16 (the values are "
        "bf16-exact, the goldens computed in float32), 4 experts in 2 groups, topk_group 1",
        cfg=dict(
            num_hidden_layers=2,
            first_k_dense_replace=0,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        bf16=True,
    ),
]


# ----------------------------------------------------------------------------------------------
# model construction and random weights


def build_model(cfg_kwargs: dict) -> DeepseekV3ForCausalLM:
    cfg = DeepseekV3Config(**{**BASE, **cfg_kwargs})
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


@torch.no_grad()
def randomize(model: DeepseekV3ForCausalLM, seed: int, bias_spec=None) -> None:
    """Re-initialise every parameter and every persistent buffer with visible random values."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("embed_tokens.weight"):
            p.copy_(normal(p.shape, 1.0))
        elif p.ndim == 1:  # RMSNorm weights (attention_bias is False: no biases)
            assert "norm" in name, name
            p.copy_(1.0 + normal(p.shape, 0.1))
        else:  # Linear [out, in], router [E, D], fused experts [E, 2F, D] / [E, D, F]
            p.copy_(normal(p.shape, 0.2))
    persistent = dict(model.state_dict(keep_vars=True))
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name not in persistent:  # rotary inv_freq / original_inv_freq: derived from config
            continue
        assert name.endswith("e_score_correction_bias"), name
        if bias_spec is None:
            b.copy_(normal(b.shape, 0.2))
        else:
            kind, lo, hi = bias_spec
            assert kind == "uniform"
            b.copy_(lo + (hi - lo) * torch.rand(b.shape, generator=g, dtype=torch.float32))
        assert (b != 0).all()


class RouterSpy:
    """Records the inputs/outputs of every DeepseekV3TopkRouter call."""

    def __init__(self, model):
        self.calls = []
        self.unbiased = {}
        self.handles = []
        for name, m in model.named_modules():
            if type(m).__name__ == "DeepseekV3TopkRouter":
                self.handles.append(m.register_forward_hook(self._hook(name, m)))

    def _hook(self, name, m):
        def fn(mod, args, out):
            router_logits, w, idx = out
            biased = router_logits.sigmoid() + mod.e_score_correction_bias
            self.calls.append(
                (name, biased.detach().clone(), idx.detach().clone(), w.detach().clone())
            )
            self.unbiased.setdefault(name, []).append(router_logits.sigmoid().detach().clone())

        return fn

    def close(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# checks


def check_routing(spy: RouterSpy, cfg, all_negative: bool):
    """Routing must vary between tokens, and the correction bias and the group limit must both matter."""
    assert spy.calls, "no MoE layer was called"
    by_layer = {}
    for name, biased, idx, w in spy.calls:
        prev = by_layer.get(name)
        by_layer[name] = (
            (biased, idx, w)
            if prev is None
            else tuple(torch.cat(z) for z in zip(prev, (biased, idx, w), strict=True))
        )
    for name, (biased, idx, w) in by_layer.items():
        sets = {tuple(sorted(r)) for r in idx.tolist()}
        assert len(sets) > 1, f"{name}: every token routed to the same experts {sets}"
        chosen = [set(r) for r in idx.tolist()]
        k = cfg.num_experts_per_tok
        s = torch.cat(spy.unbiased[name])
        no_bias = [set(r) for r in s.topk(k, -1).indices.tolist()]
        assert any(a != b for a, b in zip(chosen, no_bias, strict=True)), (
            f"{name}: the correction bias never matters"
        )
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            no_group = [set(r) for r in biased.topk(k, -1).indices.tolist()]
            assert any(a != b for a, b in zip(chosen, no_group, strict=True)), (
                f"{name}: the group limit never matters"
            )
        if all_negative:
            assert (biased < 0).all(), f"{name}: some biased score >= 0"
        if cfg.n_group > 1:
            per_group = cfg.n_routed_experts // cfg.n_group
            groups = {tuple(sorted({e // per_group for e in r})) for r in idx.tolist()}
            for gs in groups:
                assert len(gs) <= cfg.topk_group, f"{name}: experts from {gs} groups > topk_group"
            assert len(groups) > 1, f"{name}: every token kept the same groups"
        if cfg.norm_topk_prob:
            torch.testing.assert_close(
                w.sum(-1), torch.full_like(w[:, 0], cfg.routed_scaling_factor)
            )


@torch.no_grad()
def compute_goldens(model, seed: int):
    cfg = model.config
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(2, V, (2, SEQ), generator=g)
    input_ids[:, 0] = cfg.bos_token_id
    prompt_ids = torch.randint(2, V, (1, PROMPT), generator=g)
    prompt_ids[:, 0] = cfg.bos_token_id

    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits.float()
    assert logits.shape == (2, SEQ, V)
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 0.1, f"degenerate logits: std {logits.std(-1).min():.4f}"
    # logits at different positions must differ (not a constant function of the input)
    assert (logits[:, 1:] - logits[:, :1]).abs().max() > 0.1

    # Greedy decoding with the KV cache. No eos token => no min-length logits processor either, so the
    # generated ids are the plain argmax of the raw logits.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen = model.generate(
        prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
        output_scores=True,
    )
    greedy_ids = gen.sequences
    assert greedy_ids.shape == (1, PROMPT + NEW), greedy_ids.shape
    assert (
        gen.past_key_values is not None and gen.past_key_values.get_seq_length() == PROMPT + NEW - 1
    )
    raw = torch.stack(gen.logits, 1)[0].float()  # [NEW, V]
    scores = torch.stack(gen.scores, 1)[0].float()
    assert torch.equal(raw, scores), "a logits processor changed the greedy scores"
    top2 = raw.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)
    assert torch.equal(raw.argmax(-1), greedy_ids[0, PROMPT:])

    # Cached decoding must agree with a plain forward over the whole sequence.
    full = model(input_ids=greedy_ids[:, :-1], use_cache=False).logits[0, PROMPT - 1 :].float()
    diff = (full - raw).abs().max().item()
    assert diff < 1e-4, f"cached vs uncached logits differ by {diff}"
    ok = margin > 1e-3
    assert torch.equal(full.argmax(-1)[ok], greedy_ids[0, PROMPT:][ok])
    assert len(set(greedy_ids[0, PROMPT:].tolist())) > 1, "generation is a single repeated token"

    # Do not let the generate() settings leak into the saved generation_config.json.
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return dict(
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        prompt_ids=prompt_ids.numpy().astype(np.int32),
        greedy_ids=greedy_ids.numpy().astype(np.int32),
        greedy_margin=margin,
        # debugging aids (not part of the parity contract): HF's rotary tables and softmax scale
        rope_inv_freq=model.model.rotary_emb.inv_freq.float().numpy().astype(np.float32),
        rope_attention_scaling=np.float32(model.model.rotary_emb.attention_scaling),
        softmax_scale=np.float32(model.model.layers[0].self_attn.scaling),
    ), diff


def load_logits(path: Path, input_ids: np.ndarray):
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        lg = (
            model(input_ids=torch.from_numpy(input_ids).long(), use_cache=False)
            .logits.float()
            .numpy()
        )
    return lg, info, model


# ----------------------------------------------------------------------------------------------
# post-processing


def rewrite_official_config(d: Path):
    """Rewrite config.json into the form of the official deepseek-ai/DeepSeek-V3 config.json: top-level
    rope_theta + rope_scaling {type: yarn, ...}, torch_dtype, the extra MoE keys of the official file, and
    none of the keys transformers 5 adds (rope_parameters, head_dim, qk_head_dim, dtype, ...)."""
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    assert rp["rope_type"] == "yarn"
    # (rope_interleave is absent from the official file too: transformers defaults it to True)
    for k in ("head_dim", "qk_head_dim", "output_router_logits", "pad_token_id", "rope_interleave"):
        cfg.pop(k, None)
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = {
        "beta_fast": rp["beta_fast"],
        "beta_slow": rp["beta_slow"],
        "factor": rp["factor"],
        "mscale": rp["mscale"],
        "mscale_all_dim": rp["mscale_all_dim"],
        "original_max_position_embeddings": rp["original_max_position_embeddings"],
        "type": "yarn",
    }
    cfg.update(
        aux_loss_alpha=0.001,
        ep_size=1,
        moe_layer_freq=1,
        scoring_func="sigmoid",
        seq_aux=True,
        topk_method="noaux_tc",
    )
    (d / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def read_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def check_saved_layout(d: Path, model) -> None:
    """save_pretrained must write the checkpoint layout: per-expert gate/up/down, unpermuted attention."""
    cfg = model.config
    saved = read_tensors(d)
    sd = model.state_dict()
    F = cfg.moe_intermediate_size
    for n in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{n}.mlp.experts."
        gu, dn = sd[p + "gate_up_proj"], sd[p + "down_proj"]
        assert p + "gate_up_proj" not in saved
        for e in range(cfg.n_routed_experts):
            assert torch.equal(saved[p + f"{e}.gate_proj.weight"], gu[e, :F])
            assert torch.equal(saved[p + f"{e}.up_proj.weight"], gu[e, F:])
            assert torch.equal(saved[p + f"{e}.down_proj.weight"], dn[e])
        assert saved[f"model.layers.{n}.mlp.gate.e_score_correction_bias"].dtype in (
            torch.float32,
            sd[f"model.layers.{n}.mlp.gate.e_score_correction_bias"].dtype,
        )
    for k, v in sd.items():
        if "mlp.experts." not in k:
            assert torch.equal(saved[k], v), k  # q_b_proj / kv_a_proj_with_mqa etc. stored as used
    assert set(saved) - set(sd) == {k for k in saved if ".mlp.experts." in k}, (
        "unexpected tensor names in the saved checkpoint"
    )


def add_mtp(d: Path, model: DeepseekV3ForCausalLM, seed: int) -> list[str]:
    """Write mtp.safetensors with random MTP weights in the official layout at layer index L."""
    cfg = model.config
    L = cfg.num_hidden_layers
    D, _V, E, F = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    H, nope, rope, vd = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    )
    g = torch.Generator().manual_seed(seed + 7)

    def normal(shape, std=0.2):
        return (torch.randn(shape, generator=g, dtype=torch.float32) * std).contiguous()

    def norm(n):
        return (1.0 + normal((n,), 0.1)).contiguous()

    sd = model.state_dict()
    p = f"model.layers.{L}."
    t = {
        p + "enorm.weight": norm(D),
        p + "hnorm.weight": norm(D),
        p + "eh_proj.weight": normal((D, 2 * D)),
        p + "shared_head.norm.weight": norm(D),
        p + "shared_head.head.weight": sd["lm_head.weight"].clone().contiguous(),
        p + "embed_tokens.weight": sd["model.embed_tokens.weight"].clone().contiguous(),
        p + "input_layernorm.weight": norm(D),
        p + "post_attention_layernorm.weight": norm(D),
    }
    a = p + "self_attn."
    if cfg.q_lora_rank is None:
        t[a + "q_proj.weight"] = normal((H * (nope + rope), D))
    else:
        t[a + "q_a_proj.weight"] = normal((cfg.q_lora_rank, D))
        t[a + "q_a_layernorm.weight"] = norm(cfg.q_lora_rank)
        t[a + "q_b_proj.weight"] = normal((H * (nope + rope), cfg.q_lora_rank))
    t[a + "kv_a_proj_with_mqa.weight"] = normal((cfg.kv_lora_rank + rope, D))
    t[a + "kv_a_layernorm.weight"] = norm(cfg.kv_lora_rank)
    t[a + "kv_b_proj.weight"] = normal((H * (nope + vd), cfg.kv_lora_rank))
    t[a + "o_proj.weight"] = normal((D, H * vd))
    m = p + "mlp."
    t[m + "gate.weight"] = normal((E, D))
    t[m + "gate.e_score_correction_bias"] = normal((E,), 0.2)
    Fs = F * cfg.n_shared_experts
    t[m + "shared_experts.gate_proj.weight"] = normal((Fs, D))
    t[m + "shared_experts.up_proj.weight"] = normal((Fs, D))
    t[m + "shared_experts.down_proj.weight"] = normal((D, Fs))
    for e in range(E):
        t[m + f"experts.{e}.gate_proj.weight"] = normal((F, D))
        t[m + f"experts.{e}.up_proj.weight"] = normal((F, D))
        t[m + f"experts.{e}.down_proj.weight"] = normal((D, F))
    save_file(t, str(d / "mtp.safetensors"), metadata={"format": "pt"})
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        j = json.loads(idx.read_text())
        for k in t:
            j["weight_map"][k] = "mtp.safetensors"
        j["weight_map"] = dict(sorted(j["weight_map"].items()))
        meta = j.setdefault("metadata", {})
        meta["total_size"] = int(meta.get("total_size", 0)) + sum(
            v.numel() * v.element_size() for v in t.values()
        )
        if "total_parameters" in meta:
            meta["total_parameters"] = int(meta["total_parameters"]) + sum(
                v.numel() for v in t.values()
            )
        idx.write_text(json.dumps(j, indent=2) + "\n")
    return sorted(t)


# ----------------------------------------------------------------------------------------------


def rope_summary(cfg) -> str:
    rp = cfg.rope_parameters
    if rp.get("rope_type", "default") == "default":
        return f"default theta={rp['rope_theta']:g}"
    return (
        f"yarn theta={rp['rope_theta']:g} factor={rp['factor']:g} L0={rp['original_max_position_embeddings']} "
        f"mscale={rp['mscale']:g}/{rp['mscale_all_dim']:g}"
    )


def make_fp8_golden() -> str:
    """fp8_official.npz: transformers' logits on the official-layout FP8 checkpoint of
    fp8_checkpoint.py, its FP8 weights dequantized by that module's float64 routine (never by
    transformers' own FP8 code, which gets partial edge blocks wrong), plus the sha256 of the built
    files so the test can check that it converts the same bytes."""
    import tempfile

    sys.path.insert(0, str(OUT))
    import fp8_checkpoint as fc

    cfg = fc.CONFIG
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    with tempfile.TemporaryDirectory() as tmp:
        sha = fc.build(Path(tmp) / "fp8")
        assert fc.build(Path(tmp) / "again") == sha, "the FP8 builder is not deterministic"
        ref = Path(tmp) / "ref"
        ref.mkdir()
        weights = {
            k: torch.from_numpy(v.astype(np.float32)).contiguous()
            for k, v in fc.dequantized().items()
            if not k.startswith(mtp)  # HF has no MTP module
        }
        save_file(weights, str(ref / "model.safetensors"), metadata={"format": "pt"})
        plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
        (ref / "config.json").write_text(json.dumps(plain, indent=2))
        g = torch.Generator().manual_seed(4242)
        input_ids = torch.randint(2, cfg["vocab_size"], (2, SEQ), generator=g)
        input_ids[:, 0] = cfg["bos_token_id"]
        logits, info, model = load_logits(ref, input_ids.numpy())
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        sd = model.state_dict()
        kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
        assert torch.equal(sd[kv], weights[kv]), "transformers changed a weight on load"
    assert np.isfinite(logits).all() and logits.std(-1).min() > 0.1, logits.std(-1).min()
    np.savez(
        OUT / "fp8_official.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.astype(np.float32),
        files_sha256=np.array(sha),
    )
    return f"fp8_official: sha256 {sha[:16]}..., logit std {logits.std():.2f}"


def main() -> int:
    if sys.argv[1:] == ["--fp8_only"]:
        print(make_fp8_golden())
        return 0
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    if transformers.__version__ != "5.24.0":
        print(
            "WARNING: the committed goldens were made with transformers 5.24.0 / torch 2.13.0+cpu; "
            "other versions may write a different layout or slightly different numbers"
        )
    report = []
    for i, spec in enumerate(GOLDENS):
        seed = 1000 + 17 * i
        torch.manual_seed(seed)
        d = OUT / spec["name"]
        if d.exists():
            shutil.rmtree(d)
        model = build_model(spec["cfg"])
        randomize(model, seed, spec.get("bias"))
        if spec.get("bf16"):  # make every value bf16-exact, so a bf16 file holds the same model
            with torch.no_grad():
                biases = [
                    b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
                ]
                for t in [*model.parameters(), *biases]:  # not the derived rotary inv_freq
                    t.copy_(t.to(torch.bfloat16).to(t.dtype))
        spy = RouterSpy(model)
        goldens, cache_diff = compute_goldens(model, seed)
        check_routing(spy, model.config, all_negative=spec.get("bias") is not None)
        spy.close()

        kw = {"max_shard_size": spec["shard"]} if "shard" in spec else {}
        if spec.get("bf16"):
            model = model.to(torch.bfloat16)
        model.save_pretrained(d, **kw)
        np.savez(d / "golden.npz", **goldens)

        check_saved_layout(d, model)
        # Reload what we wrote: must reproduce the logits exactly.
        lg, info, _ = load_logits(d, goldens["input_ids"])
        assert np.array_equal(lg, goldens["logits"]), "reloaded checkpoint gives different logits"
        assert not info["missing_keys"] and not info["unexpected_keys"], info

        if spec.get("official_cfg"):
            rewrite_official_config(d)
            lg2, info2, m2 = load_logits(d, goldens["input_ids"])
            assert np.array_equal(lg2, goldens["logits"]), (
                "official rope_scaling form changes the logits"
            )
            assert m2.config.rope_parameters["rope_type"] == "yarn"
        if spec.get("mtp"):
            names = add_mtp(d, model, seed)
            lg3, info3, _ = load_logits(d, goldens["input_ids"])
            assert np.array_equal(lg3, goldens["logits"]), "MTP weights changed HF's logits"
            assert not info3["missing_keys"]
            print(
                f"  {spec['name']}: wrote {len(names)} MTP tensors; HF still loads (same logits) and reports "
                f"{len(info3['unexpected_keys'])} unexpected keys: {sorted(info3['unexpected_keys'])}"
            )

        size = sum(f.stat().st_size for f in d.iterdir())
        assert size < MAX_DIR_BYTES, f"{d.name}: {size} bytes"
        cfg = model.config
        line = (
            f"{spec['name']}: V={cfg.vocab_size} D={cfg.hidden_size} L={cfg.num_hidden_layers} "
            f"H={cfg.num_attention_heads} q_lora={cfg.q_lora_rank} kv_lora={cfg.kv_lora_rank} "
            f"nope/rope/v={cfg.qk_nope_head_dim}/{cfg.qk_rope_head_dim}/{cfg.v_head_dim} "
            f"E={cfg.n_routed_experts} k={cfg.num_experts_per_tok} groups={cfg.n_group}/{cfg.topk_group} "
            f"shared={cfg.n_shared_experts} dense={cfg.first_k_dense_replace} norm_topk={cfg.norm_topk_prob} "
            f"rsf={cfg.routed_scaling_factor} interleave={cfg.rope_interleave} mtp={cfg.num_nextn_predict_layers} "
            f"rope=[{rope_summary(cfg)}] cos/sin x{float(goldens['rope_attention_scaling']):.4f} "
            f"softmax_scale={float(goldens['softmax_scale']):.4f} inv_freq={np.array2string(goldens['rope_inv_freq'], precision=4)} | logit std={goldens['logits'].std():.2f} "
            f"min margin={goldens['greedy_margin'].min():.2e} cache diff={cache_diff:.1e} size={size}B"
        )
        print(line)
        report.append(line)
    line = make_fp8_golden()
    print(line)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total size of {OUT}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
