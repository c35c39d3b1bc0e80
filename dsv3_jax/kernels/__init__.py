"""Pallas kernels, each beside its plain-jnp reference and an ``impl`` switch.

- ``mla_decode.latent_attention``: absorbed-MLA decode attention over the shared latent cache
  (split-K flash-decoding).
- ``flash_attention.flash_attention``: causal flash attention in MLA's prefill/training shapes
  (dk != dv), differentiable through ``jax.custom_vjp``.

Glossary: b batch, s query positions, t key/cache positions, h heads, c kv_lora_rank,
r qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim.

Import the modules (``from dsv3_jax.kernels import mla_decode``): this package re-exports
nothing, so ``dsv3_jax.kernels.flash_attention`` is always the module, never the function.
"""
