"""Sharding rules (migu_jax/sharding.py, models/*/sharding.py) and the FSDP MIGU step on 8 CPU devices.

The FSDP step (and FSDP x tensor-parallel, with gradient accumulation) on a tiny Llama gives the one-device
step's parameters after two momentum-SGD steps within float32 tolerance (1e-5 absolute: the mesh sums in another
order) and the same masks: the same kernel columns move, i.e. the quantile is over the whole output axis
though the statistics are sharded.
"""

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import migu_jax as migu
from migu_jax import sharding
from migu_jax.models import bert, llama, param_axes, t5


def _mesh(shape):
  names = ("data", "model")[:len(shape)]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize("family, cfg", [
    (bert, bert.Config.of_size("tiny", add_pooler=True)),
    (llama, llama.Config.of_size("tiny")),
    (llama, llama.Config.of_size("tiny", tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    (t5, t5.Config.of_size("tiny")),
    (t5, t5.Config.of_size("tiny", feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
])
def test_every_parameter_of_each_family_has_a_rule(family, cfg):
  params = jax.eval_shape(lambda: family.params.init_params(cfg))
  assert sharding.unmatched(params, family.PARAM_AXES, suffixes=("kernel", "embedding", "bias", "scale")) == []
  assert family.PARAM_AXES is param_axes(cfg.model_type)


def test_fsdp_specs_of_parameters_optimizer_state_and_statistics():
  params = {"model": jax.eval_shape(lambda: llama.params.init_params(llama.Config.of_size("tiny")))}
  specs = sharding.specs_by_rules(llama.PARAM_AXES, _mesh((4, 2)))
  flat = traverse_util.flatten_dict(specs(params), sep="/")
  assert flat["model/layers_0/attention/q_proj/kernel"] == P("data", "model")
  assert flat["model/layers_0/mlp/down_proj/kernel"] == P("model", "data")
  assert flat["model/embed/embedding"] == P("model", "data")
  assert flat["model/layers_0/input_norm/scale"] == P()
  # AdamW's moments follow their parameters; the step count is replicated.
  state = jax.eval_shape(optax.adamw(1e-3).init, params)
  state_specs = specs(state)
  assert state_specs[0].mu["model"]["layers_0"]["mlp"]["up_proj"]["kernel"] == P("data", "model")
  assert state_specs[0].count == P()
  # Statistics (the kernels' output axes; a tied head's [vocab, 1]) follow the kernels' output sharding.
  stats = {"model": {"layers_0": {"attention": {"q_proj": {"kernel": np.zeros(32)}}},
                     "embed": {"embedding": np.zeros((128, 1))}}}
  stat_specs = specs(stats)["model"]
  assert stat_specs["layers_0"]["attention"]["q_proj"]["kernel"] == P("model")
  assert stat_specs["embed"]["embedding"] == P("model")
  # Without a model axis only FSDP's data axis is used; an axis that does not divide stays whole.
  data_only = sharding.specs_by_rules(llama.PARAM_AXES, _mesh((8,)))
  q = lambda shape: data_only({"attention": {"q_proj": {"kernel": np.zeros(shape)}}})["attention"]["q_proj"]["kernel"]
  assert q((32, 32)) == P("data")
  assert q((12, 32)) == P()
  assert data_only({"head": {"w": np.zeros((32, 3))}})["head"]["w"] == P()


def test_unknown_strategy_names_the_choices():
  with pytest.raises(ValueError, match="'fsdp'"):
    sharding.logical_to_mesh("zero3")


@pytest.fixture(scope="module")
def llama_case():
  """A tiny one-layer Llama's loss, parameters, two batches and MIGU with momentum SGD (optimizer state
  shaped like the parameters; on the first step a masked column does not move at all, so the columns that
  moved are the mask; Adam's g / (|g| + eps) would magnify float32 summation-order noise in tiny gradients)."""
  cfg = llama.Config.of_size("tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=1)
  model = llama.LlamaForCausalLM(cfg)
  params = llama.params.init_params(cfg)

  def loss_fn(p, batch):
    logits, mags = migu.apply_with_magnitudes(model, {"params": p}, batch["ids"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()
    return loss, mags

  rng = np.random.default_rng(0)
  batches = [{"ids": rng.integers(0, cfg.vocab_size, (16, 8)).astype(np.int32)} for _ in range(2)]
  tx = optax.chain(migu.mask_by_magnitude(0.5), optax.sgd(0.5, momentum=0.9))
  case = {"loss_fn": loss_fn, "params": params, "batches": batches, "tx": tx}
  case["expected"] = _run(case)
  return case


def _run(case, **step_kwargs):
  """``(step, params after step 1, params after step 2, optimizer state)``."""
  tx, params = case["tx"], case["params"]
  step = migu.make_train_step(case["loss_fn"], tx, **step_kwargs)
  p, s = step.place_state(params), step.place_state(tx.init(params))
  history = []
  for batch in case["batches"]:
    p, s, _ = step(p, s, batch)
    history.append(jax.tree.map(np.asarray, step.fetch(p)))  # before the next step donates p
  return step, *history, s


def _moved_rows(kernel, start):
  return np.any(np.asarray(kernel) != np.asarray(start), axis=0)


@pytest.mark.parametrize("shape", [(8,), (4, 2)])
def test_fsdp_migu_step_equals_one_device(llama_case, shape):
  mesh = _mesh(shape)
  specs = sharding.specs_by_rules(llama.PARAM_AXES, mesh)
  step, first, second, state = _run(llama_case, mode="mesh", mesh=mesh, state_specs=specs, micro_batches=2)
  _, want_first, want_second, _ = llama_case["expected"]
  start = traverse_util.flatten_dict(llama_case["params"], sep="/")
  for path, want in traverse_util.flatten_dict(want_first, sep="/").items():
    have = traverse_util.flatten_dict(first, sep="/")[path]
    np.testing.assert_allclose(have, want, atol=1e-5, err_msg=path)
    if path.endswith("kernel"):  # the masks: the same output features moved
      np.testing.assert_array_equal(_moved_rows(have, start[path]), _moved_rows(want, start[path]), err_msg=path)
      assert 0 < _moved_rows(want, start[path]).sum() < want.shape[-1]
  for have, want in zip(jax.tree.leaves(second), jax.tree.leaves(want_second)):
    np.testing.assert_allclose(have, want, atol=1e-5)
  # The state stays where the rules put it, one compilation for both steps.
  assert step.compiled._cache_size() == 1
  mu = state[1][0].trace["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert mu.sharding.spec == specs(llama_case["params"])["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert len(mu.addressable_shards) == 8 and mu.addressable_shards[0].data.size == mu.size // 8


def test_state_specs_need_the_mesh_mode():
  with pytest.raises(ValueError, match="mode='mesh'"):
    migu.make_train_step(lambda p, b: (0.0, {}), optax.sgd(0.1), state_specs=lambda t: t)
