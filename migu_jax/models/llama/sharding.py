"""Logical axes of Llama's parameters (see :mod:`migu_jax.sharding` for how a strategy maps them to a mesh).

A layer-scanned model (``Config.scan_layers``) stacks each layer's parameters under ``layers/`` with a
leading layer axis; its rules are the per-layer ones with that axis first, logical name None: never split,
so each device holds its shards of every layer and the scan gathers one layer at a time.

Example:
  >>> from migu_jax import sharding
  >>> sharding.leaf_axes(("layers_0", "mlp", "down_proj", "kernel"), 2, PARAM_AXES)
  ('mlp', 'embed')
  >>> sharding.leaf_axes(("layers", "mlp", "down_proj", "kernel"), 3, PARAM_AXES)
  (None, 'mlp', 'embed')
"""

_LAYER_AXES = (
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

STACKED_LAYER_AXES = tuple((r"(^|/)layers/.*" + pattern, (None, *axes)) for pattern, axes in _LAYER_AXES)
"""The per-layer rules for a scanned stack (``layers/...``): the leading layer axis is never split."""

PARAM_AXES = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    *STACKED_LAYER_AXES,
    *_LAYER_AXES,
)
"""``(path pattern, logical axes)`` for every parameter of :class:`LlamaForCausalLM`, unrolled or scanned."""
