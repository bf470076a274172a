"""BERT and RoBERTa encoders (Hugging Face layout) for MIGU."""
from migu_jax.models.bert.modeling import BertModel, Config, mean_pool
from migu_jax.models.bert import params

__all__ = ["BertModel", "Config", "mean_pool", "params"]
