"""Dropout of the BERT, T5 and Llama models: off by default, on with ``deterministic=False`` and an rng."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from migu_jax.models import bert, llama, t5

# Llama's Hugging Face default is no dropout; the tests turn its attention dropout on.
RATES = {"bert": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
         "t5": dict(dropout_rate=0.1), "llama": dict(attention_dropout=0.1)}
ZERO = {family: {k: 0.0 for k in rates} for family, rates in RATES.items()}


def _build(family, **overrides):
  """``(model, params, args)``: a tiny random model of ``family`` and a padded batch for it."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(2, 60, (2, 7)), jnp.int32)
  mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32)
  if family == "bert":
    model = bert.BertModel(bert.Config.of_size("tiny", **{**RATES["bert"], **overrides}))
    args = (ids, mask)
  elif family == "t5":
    model = t5.T5ForConditionalGeneration(t5.Config.of_size("tiny", **{**RATES["t5"], **overrides}))
    args = (ids, mask, ids[:, :4], mask[:, :4])
  else:
    model = llama.LlamaForCausalLM(llama.Config.of_size("tiny", **{**RATES["llama"], **overrides}))
    args = (ids, mask)
  params = model.init(jax.random.key(0), *args)["params"]
  return model, params, args


def _run(model, params, args, key=None):
  if key is None:
    return np.asarray(model.apply({"params": params}, *args))
  return np.asarray(model.apply({"params": params}, *args, deterministic=False,
                                rngs={"dropout": key}))


FAMILIES = ["bert", "t5", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_is_the_default(family):
  model, params, args = _build(family)
  default = _run(model, params, args)
  explicit = np.asarray(model.apply({"params": params}, *args, deterministic=True))
  np.testing.assert_array_equal(default, explicit)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_dropout_differs_and_is_reproducible(family):
  model, params, args = _build(family)
  deterministic = _run(model, params, args)
  first = _run(model, params, args, jax.random.key(1))
  assert np.abs(first - deterministic).max() > 1e-3
  np.testing.assert_array_equal(first, _run(model, params, args, jax.random.key(1)))
  assert np.abs(first - _run(model, params, args, jax.random.key(2))).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_rates_train_deterministically(family):
  model, params, args = _build(family, **ZERO[family])
  np.testing.assert_array_equal(_run(model, params, args, jax.random.key(1)),
                                _run(model, params, args))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_without_a_dropout_rng_fails_loudly(family):
  model, params, args = _build(family)
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, *args, deterministic=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_drops_the_same_units(family):
  model, params, args = _build(family)
  remat = type(model)(dataclasses.replace(model.config, remat=True))
  key = jax.random.key(1)
  np.testing.assert_allclose(_run(remat, params, args, key), _run(model, params, args, key),
                             rtol=1e-6, atol=1e-6)


def test_llama_drops_only_attention_weights():
  # With every attention weight dropped the attention sublayers add nothing (o_proj has no bias).
  model, params, args = _build("llama", attention_dropout=1.0)
  ids, mask = args
  dropped = _run(model, params, args, jax.random.key(1))
  no_attention = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "o_proj" in jax.tree_util.keystr(path) else x, params)
  np.testing.assert_allclose(dropped, _run(model, no_attention, args), rtol=1e-6, atol=1e-6)


def test_t5_generation_halves_stay_deterministic():
  model, params, (ids, mask, dec, dmask) = _build("t5")
  encoded = model.apply({"params": params}, ids, mask, method="encode")
  logits = model.apply({"params": params}, dec, encoded, mask, dmask, method="decode")
  np.testing.assert_allclose(logits, _run(model, params, (ids, mask, dec, dmask)), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Placement: the same sites and rates as transformers' PyTorch models
# --------------------------------------------------------------------------------------------------


def _scale_instead_of_drop(next_fun, args, kwargs, context):
  """Replaces each ``nn.Dropout`` by ``x * (1 - rate)``: a deterministic stand-in that marks where and
  with which rate dropout runs, so train-mode outputs can be compared with PyTorch's exactly."""
  mod = context.module
  if not (isinstance(mod, nn.Dropout) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  deterministic = kwargs.get("deterministic", mod.deterministic)
  return args[0] if deterministic or mod.rate == 0 else args[0] * (1 - mod.rate)


def _torch_scale_instead_of_drop(x, p=0.5, training=True, inplace=False):
  return x * (1 - p) if training and p > 0 else x


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_sites_and_rates_match_transformers(family, tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from migu_jax.models import from_pretrained

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 60, (2, 7))
  mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
  if family == "bert":
    hf_config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3, attn_implementation="eager")
    ref, args = transformers.BertModel(hf_config), (ids, mask)
    output = lambda out: out.last_hidden_state
  elif family == "t5":
    hf_config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                      dropout_rate=0.2, attn_implementation="eager")
    ref, args = transformers.T5ForConditionalGeneration(hf_config), (ids, mask, ids[:, :4], mask[:, :4])
    output = lambda out: out.logits
  else:
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_dropout=0.3, attn_implementation="eager")
    ref, args = transformers.LlamaForCausalLM(hf_config), (ids, mask)
    output = lambda out: out.logits
  ref.save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
  torch_args = {name: torch.tensor(a) for name, a in zip(names, args)}

  monkeypatch.setattr(torch.nn.functional, "dropout", _torch_scale_instead_of_drop)
  with torch.no_grad():
    want = output(ref.train()(**torch_args)).numpy()
    want_eval = output(ref.eval()(**torch_args)).numpy()
  with nn.intercept_methods(_scale_instead_of_drop):
    got = np.asarray(model.apply({"params": params}, *args, deterministic=False,
                                 rngs={"dropout": jax.random.key(0)}))
  keep = mask.astype(bool) if family != "t5" else slice(None)
  assert np.abs(want - want_eval)[keep].max() > 1e-2   # the stand-in dropout changes the output
  np.testing.assert_allclose(got[keep], want[keep], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Rates from the checkpoint's config.json
# --------------------------------------------------------------------------------------------------


def test_rates_are_read_from_a_transformers_config(tmp_path):
  transformers = pytest.importorskip("transformers")
  saved = {
      "bert": transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=37,
                                      hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2),
      "t5": transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                  num_heads=4, dropout_rate=0.3),
      "llama": transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        attention_dropout=0.3),
  }
  loaded = {}
  for family, hf_config in saved.items():
    hf_config.save_pretrained(tmp_path / family)
    loaded[family] = json.loads((tmp_path / family / "config.json").read_text())
  b = bert.Config.from_hf(loaded["bert"])
  assert (b.hidden_dropout_prob, b.attention_probs_dropout_prob) == (0.3, 0.2)
  assert t5.Config.from_hf(loaded["t5"]).dropout_rate == 0.3
  assert llama.Config.from_hf(loaded["llama"]).attention_dropout == 0.3

  # And written back where transformers reads them.
  assert transformers.BertConfig(**b.to_hf()).hidden_dropout_prob == 0.3
  assert transformers.T5Config(**t5.Config.from_hf(loaded["t5"]).to_hf()).dropout_rate == 0.3
  assert transformers.LlamaConfig(**llama.Config.from_hf(loaded["llama"]).to_hf()).attention_dropout == 0.3


def test_defaults_are_those_of_transformers():
  assert (bert.Config().hidden_dropout_prob, bert.Config().attention_probs_dropout_prob) == (0.1, 0.1)
  assert t5.Config().dropout_rate == 0.1
  assert llama.Config().attention_dropout == 0.0


# --------------------------------------------------------------------------------------------------
# The continual-learning forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [True, False])
def test_cl_forward_drops_only_when_training_with_dropout_on(dropout):
  from migu_jax.cl import methods, runner

  model, params, (ids, mask) = _build("bert")
  cfg = runner.Config(dropout=dropout)
  forward = methods.make_forward(methods.get_method("migu"), cfg, model)
  tree = {"model": params, "head": {}}
  evaluation, mags = forward(tree, ids, mask)
  training, train_mags = forward(tree, ids, mask, rng=jax.random.key(3))
  assert jax.tree.structure(mags) == jax.tree.structure(train_mags)
  if dropout:
    assert np.abs(np.asarray(training) - np.asarray(evaluation)).max() > 1e-3
  else:
    np.testing.assert_array_equal(np.asarray(training), np.asarray(evaluation))


def test_cl_forward_of_lora_keeps_the_frozen_model_deterministic():
  from migu_jax.cl import methods, runner

  model, params, (ids, mask) = _build("bert")
  cfg = runner.Config(dropout=True, lora_dropout=0.0)
  method = methods.get_method("lora")
  forward = methods.make_forward(method, cfg, model)
  tree = methods.init_params(method, cfg, params, {}, jax.random.key(0))
  evaluation, _ = forward(tree, ids, mask)
  training, _ = forward(tree, ids, mask, rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(training), np.asarray(evaluation))
