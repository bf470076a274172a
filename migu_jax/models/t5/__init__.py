"""T5 v1.0 / v1.1 / Flan encoder-decoder (Hugging Face layout) for MIGU."""
from migu_jax.models.t5.modeling import Config, T5ForConditionalGeneration, shift_right
from migu_jax.models.t5 import params
from migu_jax.models.t5.sharding import PARAM_AXES

__all__ = ["PARAM_AXES", "Config", "T5ForConditionalGeneration", "params", "shift_right"]
