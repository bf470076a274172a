"""Logical axes of Llama's parameters (see :mod:`migu_jax.sharding` for how a strategy maps them to a mesh).

Example:
  >>> from migu_jax import sharding
  >>> sharding.leaf_axes(("layers_0", "mlp", "down_proj", "kernel"), 2, PARAM_AXES)
  ('mlp', 'embed')
"""

PARAM_AXES = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"attention/q_proj/kernel$", ("embed", "heads")),
    (r"attention/(k_proj|v_proj)/kernel$", ("embed", "kv")),
    (r"attention/o_proj/kernel$", ("heads", "embed")),
    (r"attention/q_proj/bias$", ("heads",)),
    (r"attention/(k_proj|v_proj)/bias$", ("kv",)),
    (r"attention/o_proj/bias$", ("embed",)),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"mlp/(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"mlp/down_proj/bias$", ("embed",)),
    (r"norm/scale$", ("norm",)),
)
"""``(path pattern, logical axes)`` for every parameter of :class:`LlamaForCausalLM`."""
