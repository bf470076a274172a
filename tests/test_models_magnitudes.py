"""MIGU sees every projection: each 'kernel' in params gets a magnitude at the same path."""
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from migu_jax import magnitudes
from migu_jax.models import bert, llama, t5

IDS = jnp.array([[3, 4, 5, 6, 0], [7, 8, 9, 0, 0]], jnp.int32)
MASK = (IDS != 0).astype(jnp.int32)


def _family(name, remat):
  if name == "bert":
    cfg = bert.Config.of_size("tiny", add_pooler=True, remat=remat)
    return bert.BertModel(cfg), bert.params.init_params(cfg), (IDS, MASK)
  if name == "roberta":
    cfg = bert.Config.of_size("tiny", model_type="roberta", pad_token_id=1, type_vocab_size=1,
                             remat=remat)
    return bert.BertModel(cfg), bert.params.init_params(cfg), (IDS, MASK)
  if name.startswith("llama"):
    cfg = llama.Config.of_size("tiny", tie_word_embeddings=name == "llama-tied", remat=remat)
    return llama.LlamaForCausalLM(cfg), llama.params.init_params(cfg), (IDS, MASK)
  ff = "relu" if name == "t5-v1.0" else "gated-gelu"
  cfg = t5.Config.of_size("tiny", feed_forward_proj=ff, tie_word_embeddings=ff == "relu",
                         remat=remat)
  return (t5.T5ForConditionalGeneration(cfg), t5.params.init_params(cfg),
          (IDS, MASK, IDS[:, :3]))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("name", ["bert", "roberta", "llama-tied", "llama-untied",
                                  "t5-v1.0", "t5-v1.1"])
def test_every_kernel_has_a_magnitude(name, remat):
  model, params, args = _family(name, remat)
  _, mags = jax.jit(lambda p: magnitudes.apply_with_magnitudes(model, {"params": p}, *args))(params)
  flat = traverse_util.flatten_dict(params)
  kernels = {k: v for k, v in flat.items() if k[-1] == "kernel"}
  flat_mags = traverse_util.flatten_dict(mags)
  tied = {k: v for k, v in flat.items() if k in flat_mags and k[-1] == "embedding"}
  assert bool(tied) == (name in ("llama-tied", "t5-v1.0"))  # a tied lm head: the embedding's rows, [vocab, 1]
  assert set(flat_mags) == set(kernels) | set(tied)
  for path, kernel in kernels.items():
    assert flat_mags[path].shape == kernel.shape[-1:], path
  for path, embedding in tied.items():
    assert flat_mags[path].shape == (embedding.shape[0], 1), path
  if name == "llama-untied":  # q/k/v/o, gate/up/down per layer + lm_head
    assert len(kernels) == 2 * 7 + 1
  if name == "t5-v1.1":  # enc: 4 attn + 3 mlp, dec: 8 attn + 3 mlp, per layer; + lm_head
    assert len(kernels) == 2 * 7 + 2 * 11 + 1


def _main_output(out):
  return out[0] if isinstance(out, tuple) else out   # BERT with pooler: (hidden, pooled)


@pytest.mark.parametrize("name", ["llama-tied", "t5-v1.1"])  # BERT: test_models_bert
def test_bfloat16_compute_keeps_float32_params(name):
  import dataclasses
  import numpy as np
  model, params, args = _family(name, False)
  model16 = type(model)(dataclasses.replace(model.config, dtype=jnp.bfloat16))
  run = lambda m: jax.jit(lambda p: _main_output(m.apply({"params": p}, *args)))(params)
  out32, out16 = np.asarray(run(model)), run(model16)
  assert out16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out16, np.float32) - out32).max() < 0.05 * (1 + np.abs(out32).max())
  loss = lambda p: _main_output(model16.apply({"params": p}, *args)).astype(jnp.float32).sum()
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params)))
