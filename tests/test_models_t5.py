"""T5 v1.0 (relu, tied) and v1.1 (gated-gelu, untied): parity, generation, round trip."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from migu_jax.models import from_pretrained, save_pretrained  # noqa: E402
from migu_jax.models.generation import greedy_generate_seq2seq  # noqa: E402
from migu_jax.models.t5 import shift_right  # noqa: E402

TOL = 1e-4


def _hf_t5(ff, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, feed_forward_proj=ff, relative_attention_num_buckets=8,
      relative_attention_max_distance=12, tie_word_embeddings=ff == "relu")
  return transformers.T5ForConditionalGeneration(cfg).eval()


def _write_untied(model, folder):
  """transformers 5 always ties T5's head; give it its own and save like T5 v1.1 did."""
  from safetensors.torch import save_file
  model.lm_head.weight = torch.nn.Parameter(torch.randn(model.config.vocab_size, model.config.d_model))
  os.makedirs(folder, exist_ok=True)
  cfg = {**model.config.to_dict(), "tie_word_embeddings": False,
         "architectures": ["T5ForConditionalGeneration"]}
  cfg.pop("scale_decoder_outputs", None)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  state = {k: v.clone().contiguous() for k, v in model.state_dict().items()
           if "embed_tokens" not in k}
  save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 64, size=(3, 20))   # long enough for the log-spaced buckets
  mask = np.ones_like(ids)
  mask[0, 12:] = 0
  mask[1, 5:] = 0
  dec = rng.integers(2, 64, size=(3, 15))
  dmask = np.ones_like(dec)
  dmask[2, 9:] = 0
  return ids, mask, dec, dmask


def _torch_logits(model, ids, mask, dec, dmask):
  t = torch.tensor
  with torch.no_grad():
    return model(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                 decoder_attention_mask=t(dmask)).logits.numpy()


@pytest.mark.parametrize("version", ["v1.0-relu-tied", "v1.1-gated-gelu-untied"])
def test_parity_with_transformers(version, tmp_path):
  tied = version.startswith("v1.0")
  ref = _hf_t5("relu" if tied else "gated-gelu")
  if tied:
    ref.save_pretrained(tmp_path)
  else:
    _write_untied(ref, str(tmp_path))
  ids, mask, dec, dmask = _inputs()
  want = _torch_logits(ref, ids, mask, dec, dmask)
  model, params, _ = from_pretrained(str(tmp_path))
  assert model.config.tie_word_embeddings is tied and model.config.scale_decoder_outputs is tied
  assert ("lm_head" in params) is (not tied)
  got = np.asarray(model.apply({"params": params}, ids, mask, dec, dmask))
  keep = dmask.astype(bool)
  assert np.abs(got[keep] - want[keep]).max() < TOL

  # encode + decode give the same logits as __call__.
  encoded = model.apply({"params": params}, ids, mask, method="encode")
  split = model.apply({"params": params}, dec, encoded, mask, dmask, method="decode")
  np.testing.assert_allclose(np.asarray(split), got, atol=1e-6)


def test_greedy_generation_matches_transformers(tmp_path):
  ref = _hf_t5("relu", seed=3)
  ref.save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  ids, mask, _, _ = _inputs(seed=1)
  ours = np.asarray(greedy_generate_seq2seq(model, params, ids, mask, max_new_tokens=6,
                                            eos_token_id=-1))
  with torch.no_grad():
    hf = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1,
                      decoder_start_token_id=0, use_cache=False)
  np.testing.assert_array_equal(ours, hf[:, 1:].numpy())


def test_round_trip_and_pytorch_load(tmp_path):
  ref = _hf_t5("relu", seed=4)
  ref.save_pretrained(tmp_path / "a")
  model, params, _ = from_pretrained(str(tmp_path / "a"))
  save_pretrained(model, params, str(tmp_path / "b"))
  _, again, _ = from_pretrained(str(tmp_path / "b"))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
  inputs = _inputs(seed=2)
  np.testing.assert_allclose(_torch_logits(back, *inputs), _torch_logits(ref, *inputs), atol=1e-6)


def test_untied_round_trip_keeps_lm_head(tmp_path):
  ref = _hf_t5("gated-gelu", seed=5)
  _write_untied(ref, str(tmp_path / "a"))
  model, params, _ = from_pretrained(str(tmp_path / "a"))
  save_pretrained(model, params, str(tmp_path / "b"))
  model2, again, _ = from_pretrained(str(tmp_path / "b"))
  assert model2.config == model.config
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
  inputs = _inputs(seed=2)
  np.testing.assert_allclose(_torch_logits(back, *inputs), _torch_logits(ref, *inputs), atol=1e-6)


def test_tied_unscaled_head_saves_for_pytorch(tmp_path):
  # A v1.1 config written by transformers 5: tied head, no output scaling.
  ref = _hf_t5("gated-gelu", seed=6)
  ref.config.tie_word_embeddings = True
  ref.save_pretrained(tmp_path / "a")
  model, params, _ = from_pretrained(str(tmp_path / "a"))
  assert model.config.tie_word_embeddings and not model.config.scale_decoder_outputs
  inputs = _inputs(seed=3)
  want = _torch_logits(ref, *inputs)
  keep = inputs[3].astype(bool)
  assert np.abs(np.asarray(model.apply({"params": params}, *inputs))[keep] - want[keep]).max() < TOL
  save_pretrained(model, params, str(tmp_path / "b"))
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
  np.testing.assert_allclose(_torch_logits(back, *inputs), want, atol=1e-6)


def test_shift_right_and_missing_decoder_inputs(tmp_path):
  np.testing.assert_array_equal(np.asarray(shift_right(np.array([[4, 5, -100]]))), [[0, 4, 5]])
  _hf_t5("relu").save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="decoder_input_ids"):
    model.apply({"params": params}, np.ones((1, 3), np.int32))
