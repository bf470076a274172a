"""Llama decoder (Hugging Face layout) for MIGU; SmolLM2 loads from GGUF."""
from migu_jax.models.llama.modeling import Config, LlamaForCausalLM
from migu_jax.models.llama import params

__all__ = ["Config", "LlamaForCausalLM", "params"]
