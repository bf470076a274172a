"""Mixed precision: bfloat16 compute keeps float32 parameters, optimizer state and MIGU statistics.

The model computes in ``Config.dtype`` (its logits come out bfloat16); the parameters, their gradients, the
AdamW moments and the magnitudes stay float32 (``Config.param_dtype`` changes the stored dtype only when
asked). The settings reach the runner's model and head, and the CLI's flags reach Config.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import migu_jax as migu
from migu_jax import cli
from migu_jax.models import llama
from tiny_cl import tiny_config


def _dtypes(tree) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_compute_keeps_float32_params_state_and_statistics():
  cfg = llama.Config.of_size("tiny", num_hidden_layers=1, dtype=jnp.bfloat16)
  model = llama.LlamaForCausalLM(cfg)
  params = llama.params.init_params(cfg)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 8)).astype(np.int32)
  logits, mags = migu.apply_with_magnitudes(model, {"params": params}, ids)
  assert logits.dtype == jnp.bfloat16 and _dtypes(mags) == {"float32"} and _dtypes(params) == {"float32"}

  def loss_fn(p, batch):
    logits, mags = migu.apply_with_magnitudes(model, {"params": p}, batch)
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean(), mags

  tx = optax.chain(migu.mask_by_magnitude(0.7), optax.adamw(1e-3))
  step = migu.make_train_step(loss_fn, tx)
  new, state, loss = step(step.place_state(params), step.place_state(tx.init(params)), ids)
  assert np.isfinite(float(loss)) and _dtypes(new) == {"float32"} and _dtypes(state) == {"float32"}
  assert not np.array_equal(new["layers_0"]["mlp"]["up_proj"]["kernel"], params["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_runner_precision_settings(tiny_models, tmp_path):
  from migu_jax.cl import methods, runner

  cfg = tiny_config(tiny_models["llama"], tmp_path, order="amazon", dtype="bfloat16", remat=True)
  tasks = runner.load_tasks(cfg, 0)
  head = runner._head(cfg, tasks)
  assert head.model.config.dtype == jnp.bfloat16 and head.model.config.remat
  method = methods.get_method("migu")
  model_params = runner.run_model(cfg)[1]
  params = runner.cast_floats(methods.init_params(method, cfg, model_params, head.init(jax.random.key(0)), None),
                              cfg.param_dtype)
  tx, step, _ = runner._step_and_placement(cfg, method, 0, head)
  batch = head.train_batch([(0, r) for r in tasks[0].train[:cfg.batch_size]])
  batch["rng"] = np.broadcast_to(np.asarray(jax.random.key_data(jax.random.key(1))), (len(batch["ids"]), 2))
  new, state, loss = step(step.place_state(params), step.place_state(tx.init(params)), batch)
  assert np.isfinite(float(loss)) and _dtypes(new) == {"float32"} and _dtypes(state) == {"float32"}
  forward = methods.make_forward(method, cfg, head.model)
  assert _dtypes(head.loss(forward, params, batch)[1]) == {"float32"}
  # param_dtype="bfloat16" stores the parameters (and so AdamW's moments) in bfloat16.
  assert _dtypes(runner.cast_floats(params, "bfloat16")) == {"bfloat16"}
  with pytest.raises(ValueError, match="Config.dtype='float8'; expected one of"):
    cfg.replace(dtype="float8")


def test_cli_precision_and_sharding_flags(tmp_path):
  args = cli.parser().parse_args(["run", "--output", str(tmp_path), "--mode", "mesh", "--sharding", "fsdp",
                                  "--dtype", "bfloat16", "--param-dtype", "float32", "--remat"])
  cfg = cli.build_config(args)
  assert (cfg.sharding, cfg.dtype, cfg.param_dtype, cfg.remat) == ("fsdp", "bfloat16", "float32", True)
  assert cli.build_config(cli.parser().parse_args(["run", "--output", str(tmp_path)])).remat is False
