"""Logical axes of BERT/RoBERTa's parameters (see :mod:`migu_jax.sharding`).

Example:
  >>> from migu_jax import sharding
  >>> sharding.leaf_axes(("layers_0", "intermediate", "kernel"), 2, PARAM_AXES)
  ('embed', 'mlp')
"""

PARAM_AXES = (
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"(position|token_type)_embeddings/embedding$", (None, "embed")),
    (r"attention/(query|key|value)/kernel$", ("embed", "heads")),
    (r"attention/(query|key|value)/bias$", ("heads",)),
    (r"attention/out/kernel$", ("heads", "embed")),
    (r"intermediate/kernel$", ("embed", "mlp")),
    (r"intermediate/bias$", ("mlp",)),
    (r"output/kernel$", ("mlp", "embed")),
    (r"pooler/kernel$", ("embed", "embed")),
    (r"(attention/out|output|pooler)/bias$", ("embed",)),
    (r"(norm|layer_norm)/(scale|bias)$", ("norm",)),
)
"""``(path pattern, logical axes)`` for every parameter of :class:`BertModel`."""
