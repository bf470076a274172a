"""Runner methods beyond the reference: other importance sources, threshold rules, padding-aware magnitudes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_cl import once_per_run, tiny_config


@pytest.mark.parametrize("method", ["grad_mask", "weight_mask", "fisher_mask"])
def test_table11_importance_methods_run(tiny_models, tmp_path, method):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, methods=(method,), magnitude_batches=0)
  run = runner.run_sequence(cfg, method, 0)
  assert np.array(run["matrix"]).shape == (3, 3)
  assert all(np.isfinite(loss) for loss in run["final_loss"])


def _migu(models, folder, **overrides):
  return tiny_config(models["bert"], folder, magnitude_batches=0, **overrides)


@pytest.fixture(scope="session")
def migu_run(tiny_models, tmp_path_factory):
  """MIGU at the default settings, to compare the runs of other settings with."""
  def run(folder):
    from migu_jax.cl import runner
    return runner.run_sequence(_migu(tiny_models, folder), "migu", 0)

  return once_per_run(tmp_path_factory, "test_cl_methods.migu_run", run)


@pytest.mark.parametrize("threshold", ["top_k", "l1_mass"])
def test_threshold_rules_change_the_run(tiny_models, tmp_path, migu_run, threshold):
  from migu_jax.cl import runner

  other = runner.run_sequence(_migu(tiny_models, tmp_path, threshold=threshold), "migu", 0)
  assert other["params_sha256"] != migu_run["params_sha256"]


def test_padding_aware_forward_passes_each_stack_its_mask():
  from migu_jax.cl import methods, runner

  cfg = runner.Config(padding_aware=True)
  enc, dec = jnp.ones((2, 5)), jnp.zeros((2, 3))
  assert methods.token_mask(cfg, ("ids", enc)) is enc
  assert methods.token_mask(cfg, ("ids", enc, "dec", dec)) == {"encoder": enc, "decoder": dec, "lm_head": dec,
                                                                       "shared": dec}
  assert methods.token_mask(runner.Config(), ("ids", enc)) is None


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_padding_aware_magnitudes_equal_those_of_the_unpadded_rows(tiny_models, family):
  from migu_jax.cl import methods, runner

  cfg = runner.Config(model=tiny_models[family], padding_aware=True)
  model, params, _ = runner.load_model(cfg.model)
  ids = np.random.default_rng(0).integers(5, 200, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), np.int32)
  mask[1, 7:] = 0  # the second row is padded after 7 tokens
  trainable = {"model": params}
  method = methods.get_method("migu")

  forwards = {aware: jax.jit(methods.make_forward(method, cfg.replace(padding_aware=aware), model))
              for aware in (True, False)}  # compiled whole: op by op, the first calls compile every operation

  def mags(aware, *args):
    return forwards[aware](trainable, *args)[1]["model"]

  def inputs(rows, n=12):
    enc = (ids[rows, :n], mask[rows, :n])
    return enc + enc if family == "t5" else enc  # T5: the same tokens and padding on both stacks

  aware, plain = mags(True, *inputs(slice(0, 2))), mags(False, *inputs(slice(0, 2)))
  unpadded = jax.tree.map(jnp.add, mags(False, *inputs(slice(0, 1))), mags(False, *inputs(slice(1, 2), 7)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4), aware, unpadded)
  gap = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), plain, unpadded)
  assert max(jax.tree.leaves(gap)) > 1e-3  # the reference counts the padded positions


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_layer_types_split_the_kernels_into_attention_and_feed_forward(tiny_models, family):
  from migu_jax import masking
  from migu_jax.cl import methods, optimizers, runner

  _, params, _ = runner.load_model(tiny_models[family])
  paths = [p for p, leaf in jax.tree_util.tree_flatten_with_path({"model": params})[0]]
  keys = [tuple(k.key for k in p) for p in paths]
  kernels = {k for k in keys if masking.is_kernel(k, None)}
  method = methods.get_method("migu")

  def chosen(targets):
    where = optimizers._where(method, optimizers.mask_patterns(runner.Config(mask_targets=targets)))
    return {k for k in kernels if where(k, None)}

  attention, ffn = chosen(("attention",)), chosen(("ffn",))
  assert attention and ffn and not attention & ffn
  assert chosen(()) == kernels and chosen(("all",)) == kernels
  # every kernel of the layer stacks is one or the other (the rest: embeddings' or heads' projections)
  layered = {k for k in kernels if any(str(part).startswith("layers_") for part in k)}
  assert layered == attention | ffn
  assert all("attention" in "/".join(k) for k in attention)


def test_mask_targets_limit_the_mask_to_their_layers(tiny_models, tmp_path, migu_run):
  from migu_jax.cl import runner

  attn = runner.run_sequence(_migu(tiny_models, tmp_path / "a", mask_targets=("attention",)), "migu", 0)
  assert attn["params_sha256"] != migu_run["params_sha256"]
  with pytest.raises(ValueError, match="mask_targets"):
    runner.run_sequence(_migu(tiny_models, tmp_path / "bad", mask_targets=("attention[",)), "migu", 0)
  with pytest.raises(ValueError, match="selects no layer.*paths such as"):  # a no-op mask is an error
    runner.run_sequence(_migu(tiny_models, tmp_path / "none", mask_targets=(r"no_such_layer_\d",)), "migu", 0)


def test_warmup_schedule_rises_then_stays():
  from migu_jax.cl import optimizers, runner

  schedule = optimizers.SCHEDULES["warmup_constant"](runner.Config(learning_rate=1e-3, warmup_steps=4))
  np.testing.assert_allclose([float(schedule(i)) for i in (0, 2, 4, 10)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_optimizer_state_is_reset_at_each_task_unless_asked_to_carry_it(tiny_models, tmp_path, migu_run):
  from migu_jax.cl import methods, optimizers, runner

  cfg = runner.Config(methods=("migu",))
  method = methods.get_method("migu")
  params = {"model": {"dense": {"kernel": jnp.ones((2, 3))}}, "head": {}}
  tx = optimizers.make_optimizer(method, cfg)
  moved = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, tx.init(params))

  def moments(state):
    return [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (2, 3)]

  fresh = optimizers.start_task(method, cfg, tx, params, 1, moved)
  carried = optimizers.start_task(method, cfg.replace(reset_optimizer=False), tx, params, 1, moved)
  assert all(float(m.sum()) == 0 for m in moments(fresh))
  assert all(float(m.sum()) == 6 for m in moments(carried))
  assert optimizers.start_task(method, cfg.replace(reset_optimizer=False), tx, params, 0, moved) is not moved
  kept = runner.run_sequence(_migu(tiny_models, tmp_path, reset_optimizer=False), "migu", 0)
  assert kept["params_sha256"] != migu_run["params_sha256"]


def test_one_threshold_resolver_for_config_and_masks():
  from migu_jax.cl import optimizers, runner
  assert optimizers._threshold(runner.Config(exact_count=True)) == "top_k"
  assert optimizers._threshold(runner.Config()) == "quantile"
  with pytest.raises(ValueError, match="exact_count=True is threshold='top_k'"):
    runner.Config(exact_count=True, threshold="l1_mass")
  old = runner._identity(runner.Config(), "migu", 0)  # checkpoints of the old default resume
  assert old["threshold"] == "quantile"
