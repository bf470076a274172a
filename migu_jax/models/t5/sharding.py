"""Logical axes of T5's parameters (see :mod:`migu_jax.sharding`).

Example:
  >>> from migu_jax import sharding
  >>> sharding.leaf_axes(("encoder", "layers_0", "mlp", "wo", "kernel"), 2, PARAM_AXES)
  ('mlp', 'embed')
"""

PARAM_AXES = (
    (r"(^|/)shared/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"relative_attention_bias/embedding$", (None, None)),
    (r"attention/(q|k|v)/kernel$", ("embed", "heads")),
    (r"attention/o/kernel$", ("heads", "embed")),
    (r"mlp/(wi|wi_0|wi_1)/kernel$", ("embed", "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    (r"norm/scale$", ("norm",)),
)
"""``(path pattern, logical axes)`` for every parameter of :class:`T5ForConditionalGeneration`."""
