"""Llama decoder (Hugging Face layout) for MIGU; SmolLM2 loads from GGUF."""
from migu_jax.models.llama.modeling import Config, LlamaForCausalLM
from migu_jax.models.llama import params
from migu_jax.models.llama.sharding import PARAM_AXES

__all__ = ["PARAM_AXES", "Config", "LlamaForCausalLM", "params"]
