"""migu_jax: MIGU continual learning for JAX/Flax language models.

MIGU (Du et al., 2024) updates, in every linear layer, only the output features
whose activations have the largest L1 magnitude on the current batch::

    import optax, migu_jax as migu

    tx = optax.chain(migu.mask_by_magnitude(0.7), optax.adamw(1e-4))
    logits, mags = migu.apply_with_magnitudes(model, {"params": params}, x)
    updates, opt_state = tx.update(grads, opt_state, params, magnitudes=mags)
"""

from migu_jax import importance
from migu_jax import lora
from migu_jax import nnx
from migu_jax import sharding
from migu_jax.magnitudes import COLLECTION
from migu_jax.magnitudes import LINEAR_MODULES
from migu_jax.magnitudes import apply_with_magnitudes
from migu_jax.magnitudes import magnitude_paths
from migu_jax.magnitudes import sum_abs
from migu_jax.masking import THRESHOLDS
from migu_jax.masking import MaskState
from migu_jax.masking import StrictMaskState
from migu_jax.masking import apply_masks
from migu_jax.masking import is_kernel
from migu_jax.masking import is_output_layer
from migu_jax.masking import keep_mask
from migu_jax.masking import kept_count
from migu_jax.masking import layer_masks
from migu_jax.masking import mask_by_importance
from migu_jax.masking import mask_by_magnitude
from migu_jax.masking import random_mask
from migu_jax.masking import strict_mask_by_magnitude
from migu_jax.train_step import TrainStep
from migu_jax.train_step import accumulate_gradients
from migu_jax.train_step import make_train_step

__version__ = "0.1.0"

__all__ = (
    "COLLECTION",
    "LINEAR_MODULES",
    "MaskState",
    "StrictMaskState",
    "THRESHOLDS",
    "TrainStep",
    "accumulate_gradients",
    "apply_masks",
    "apply_with_magnitudes",
    "is_kernel",
    "is_output_layer",
    "keep_mask",
    "kept_count",
    "layer_masks",
    "importance",
    "lora",
    "nnx",
    "sharding",
    "magnitude_paths",
    "make_train_step",
    "mask_by_importance",
    "mask_by_magnitude",
    "random_mask",
    "strict_mask_by_magnitude",
    "sum_abs",
)
