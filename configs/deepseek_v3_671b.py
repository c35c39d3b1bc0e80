"""DeepSeek-V3 671B (the official config.json): 61 layers, 256 routed experts, MTP depth 1."""

import dataclasses

import ml_collections

from dsv3_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    model = dataclasses.asdict(ModelConfig())  # the defaults are the 671B checkpoint's values
    model["rope_scaling"] = ModelConfig().rope_scaling  # keep the frozen dataclass
    model.update(dtype="bfloat16", param_dtype="float32", remat=True)
    c.model = model
    return c
