"""Flax linen models for MIGU: T5, BERT/RoBERTa and Llama, with Hugging Face I/O.

Every linear projection is an ``nn.Dense`` laid out as in Hugging Face, so
each torch ``Linear`` is one Flax kernel and MIGU can capture its output.

Example:
  >>> from migu_jax.models import from_pretrained, mean_pool
  >>> model, params, tokenizer = from_pretrained("minilm")
  >>> batch = tokenizer(["a cat", "a dog"], return_tensors="np", padding=True)
  >>> hidden = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  >>> mean_pool(hidden, batch["attention_mask"]).shape
  (2, 384)
"""

from migu_jax.models import bert, llama, t5
from migu_jax.models._checkpoint import CheckpointError
from migu_jax.models.bert.modeling import mean_pool
from migu_jax.models.generation import greedy_generate, greedy_generate_seq2seq
from migu_jax.models.hub import FAMILIES, from_pretrained, param_axes, save_pretrained
from migu_jax.models.presets import PRESETS

__all__ = [
    "CheckpointError",
    "FAMILIES",
    "PRESETS",
    "bert",
    "from_pretrained",
    "greedy_generate",
    "greedy_generate_seq2seq",
    "llama",
    "mean_pool",
    "param_axes",
    "save_pretrained",
    "t5",
]
