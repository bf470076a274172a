"""BERT and RoBERTa encoders (Hugging Face layout) for MIGU."""
from migu_jax.models.bert.modeling import BertModel, Config, mean_pool
from migu_jax.models.bert import params
from migu_jax.models.bert.sharding import PARAM_AXES

__all__ = ["PARAM_AXES", "BertModel", "Config", "mean_pool", "params"]
