"""migu_jax: MIGU continual learning for JAX/Flax."""
