"""A tiny transformer classifier for the core tests: Embed, LayerNorm, Dense,
DenseGeneral (attention heads) and biases, small enough to step in milliseconds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import migu_jax as migu

VOCAB, SEQ, WIDTH, HEADS, CLASSES = 32, 6, 16, 2, 3


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((HEADS, WIDTH // HEADS), name="query")(h)
    k = nn.DenseGeneral((HEADS, WIDTH // HEADS), name="key")(h)
    v = nn.DenseGeneral((HEADS, WIDTH // HEADS), name="value")(h)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS))
    a = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(a)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(WIDTH, name="down")(nn.gelu(nn.Dense(2 * WIDTH, name="up")(h)))


class Tiny(nn.Module):
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, WIDTH)(ids)
    for i in range(self.layers):
      x = Block(name=f"block_{i}")(x)
    return nn.Dense(CLASSES, name="head")(nn.LayerNorm()(x).mean(axis=1))


MODEL = Tiny()


def make_batch(seed: int, size: int = 16):
  rng = np.random.default_rng(seed)
  return {
      "ids": rng.integers(0, VOCAB, (size, SEQ)).astype(np.int32),
      "label": rng.integers(0, CLASSES, (size,)).astype(np.int32),
  }


def init_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed), make_batch(0, 2)["ids"])["params"]


def loss_fn(params, batch):
  logits, mags = migu.apply_with_magnitudes(MODEL, {"params": params}, batch["ids"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, mags


def kernel_paths(params):
  return [p for p in migu.magnitude_paths(params) if p[-1] == "kernel"]
