"""Llama and SmolLM2 (GGUF): parity with transformers, generation, round trip, errors."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from migu_jax.models import from_pretrained, save_pretrained  # noqa: E402
from migu_jax.models.generation import greedy_generate  # noqa: E402
from migu_jax.models.llama import gguf as llama_gguf  # noqa: E402

TOL = 1e-4


def _tiny_hf(tie, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie,
      rope_theta=5000.0, rms_norm_eps=1e-5)
  return transformers.LlamaForCausalLM(cfg).eval()


def _torch_logits(model, ids, mask=None, **kw):
  with torch.no_grad():
    args = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(input_ids=torch.tensor(ids), **args, **kw).logits.numpy()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_parity_gqa_with_padding(tie, tmp_path):
  ref = _tiny_hf(tie)
  ref.save_pretrained(tmp_path)
  ids = np.random.default_rng(0).integers(0, 101, size=(3, 8))
  mask = np.ones_like(ids)
  mask[0, 5:] = 0
  mask[2, 2:] = 0
  want = _torch_logits(ref, ids, mask)
  model, params, _ = from_pretrained(str(tmp_path))
  assert ("lm_head" in params) is (not tie)
  assert params["layers_0"]["attention"]["k_proj"]["kernel"].shape == (48, 16)  # 2 kv heads x 8
  got = np.asarray(model.apply({"params": params}, ids, mask))
  keep = mask.astype(bool)
  assert np.abs(got[keep] - want[keep]).max() < TOL


def test_parity_scanned_layers(tmp_path):
  ref = _tiny_hf(False)
  ref.save_pretrained(tmp_path)
  ids = np.random.default_rng(0).integers(0, 101, size=(2, 8))
  mask = np.ones_like(ids)
  mask[0, 5:] = 0
  model, params, _ = from_pretrained(str(tmp_path), scan_layers=True)
  assert params["layers"]["attention"]["k_proj"]["kernel"].shape == (2, 48, 16)  # 2 layers stacked
  got = np.asarray(model.apply({"params": params}, ids, mask))
  keep = mask.astype(bool)
  assert np.abs(got[keep] - _torch_logits(ref, ids, mask)[keep]).max() < TOL


def test_left_padded_generation_matches_unpadded(tmp_path):
  _tiny_hf(True, seed=1).save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  prompt = np.array([[5, 17, 33, 2, 8]])
  alone = greedy_generate(model, params, prompt, max_new_tokens=6, eos_token_id=-1)
  padded = np.array([[0, 0, 5, 17, 33, 2, 8], [3, 4, 5, 6, 7, 8, 9]])
  mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
  batch = greedy_generate(model, params, padded, mask, max_new_tokens=6, eos_token_id=-1)
  np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(batch)[0])
  # Same tokens as transformers' greedy generate.
  ref = _tiny_hf(True, seed=1)
  with torch.no_grad():
    hf = ref.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[0, 5:].numpy()
  np.testing.assert_array_equal(np.asarray(alone)[0], hf)


def test_unpermute_inverts_llama_cpp_permutation():
  def llama_cpp_permute(w, n_head):  # as llama.cpp's convert_hf_to_gguf.py does it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(llama_gguf.unpermute_qk(llama_cpp_permute(w, 3), 3), w)


@pytest.fixture(scope="module")
def smollm2():
  return from_pretrained("smollm2-135m")


def _chat_ids(tokenizer, question):
  msgs = [{"role": "user", "content": question}]
  out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True,
                                      return_tensors="np")
  return np.asarray(out["input_ids"])


def test_smollm2_config_and_tokenizer(smollm2):
  model, params, tokenizer = smollm2
  cfg = model.config
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
          cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  assert cfg.rope_theta == 100000.0
  text = "Hello world, 2024 is here!  Café"
  assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
  assert tokenizer("<|im_start|>user")["input_ids"][0] == 1
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_smollm2_matches_transformers_and_round_trips(smollm2, tmp_path):
  model, params, tokenizer = smollm2
  save_pretrained(model, params, str(tmp_path), tokenizer)
  _, again, tokenizer2 = from_pretrained(str(tmp_path))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))

  ids = _chat_ids(tokenizer, "Name three colours.")
  np.testing.assert_array_equal(ids, _chat_ids(tokenizer2, "Name three colours."))
  ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  want = _torch_logits(ref, ids)
  got = np.asarray(model.apply({"params": params}, ids))
  # 30 layers, logits of size ~20: float32 summation order differs slightly.
  assert np.abs(got - want).max() < 1e-3
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_smollm2_knows_the_capital_of_france(smollm2):
  model, params, tokenizer = smollm2
  ids = _chat_ids(tokenizer, "What is the capital of France?")
  out = greedy_generate(model, params, ids, max_new_tokens=10)
  assert "Paris" in tokenizer.decode(np.asarray(out)[0], skip_special_tokens=True)


def test_error_unsupported_gguf_tensor_type(tmp_path):
  path = str(tmp_path / "bad.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_token_list(["a", "b", "c"])
  w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), np.int8))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(NotImplementedError, match=r"blk\.0\.attn_q\.weight \(I8\)"):
    from_pretrained(path)   # a .gguf file goes to llama.gguf.from_gguf


def test_cached_generation_equals_full_recompute(tmp_path):
  _tiny_hf(False, seed=2).save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  ids = np.array([[0, 0, 5, 17, 33], [3, 4, 5, 6, 7]])
  mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int32)
  kw = dict(max_new_tokens=7, eos_token_id=-1)
  cached = greedy_generate(model, params, ids, mask, **kw)
  full = greedy_generate(model, params, ids, mask, use_cache=False, **kw)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
  # Stopping: rows that emitted eos continue with pad.
  first = int(np.asarray(cached)[0, 2])
  stopped = np.asarray(greedy_generate(model, params, ids, mask, max_new_tokens=7,
                                       eos_token_id=first, pad_token_id=99))
  row = list(stopped[0])
  assert row[row.index(first) + 1:] == [99] * (6 - row.index(first))


def test_options_scored_through_their_prefix_tree_equal_full_forwards(tmp_path):
  from migu_jax.models.generation import option_log_likelihoods

  hf = _tiny_hf(True, seed=3)
  hf.save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  prompts = [[7, 8, 9, 10], [11, 12]]  # the second left-padded to 4
  ids = np.array([[7, 8, 9, 10], [0, 0, 11, 12]])
  mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int32)
  options = [[5, 6], [5, 7], [8], [5, 6, 9]]  # shared prefixes, different lengths
  option_ids = np.array([o + [0] * (3 - len(o)) for o in options])
  option_mask = np.array([[1] * len(o) + [0] * (3 - len(o)) for o in options], np.int32)
  scores = np.asarray(option_log_likelihoods(model, params, ids, mask, option_ids, option_mask))
  for b, prompt in enumerate(prompts):
    for k, option in enumerate(options):  # by hand: PyTorch's full forward over prompt + option
      logp = torch.log_softmax(torch.tensor(_torch_logits(hf, [prompt + option])[0]), -1)
      expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))
      assert scores[b, k] == pytest.approx(expected, abs=1e-4), (b, k)
