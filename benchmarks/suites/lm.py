"""LM core: train-step and decode throughput, ours vs transformers/PyTorch in the same run; MFU on GPU.

Train step = forward + backward + global-norm clipping (1.0) + AdamW on SmolLM2-135M shapes with
random tokens (f32 on CPU), the same work on both sides (torch clips its gradients from
2026-11-26 17:40 on; earlier results had ours clip and torch not). Each contender is timed alone
in a fresh process, the processes alternating over ``train_rounds`` rounds
(``train_isolation="interleaved"``: both in this process, alternating steps, as measured before
2026-11-26 18:40). Ours compiles with the train step's default XLA options (oneDNN matmuls on CPU
from 2026-11-26 20:30 on; recorded per result); ``train_extra: ["ours_xla_default"]`` adds ours
with XLA's own defaults as a third contender.
Decode = greedy KV-cache generation of ``new_tokens`` after a ``prompt_len`` prompt, forced to
full length (no stop token), with the SmolLM2-135M-Instruct GGUF weights (random weights if the
asset is missing; recorded). MFU (GPU preset): model FLOPs 6*N_mm + 6*L*T*H*hd per token
(causal attention counted at half), over the chip's dense bf16 peak.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import block, timeit, timeit_interleaved
from lmx.models import ModelConfig, Transformer, generate, hf_state_dict, load, next_token_logprobs
from lmx.train import TrainConfig, causal_lm_loss, init_state, make_optimizer, make_train_step

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Train-step contenders of ours: the library's default compile (oneDNN matmuls on CPU) and,
# for comparison, XLA's own defaults (YNNPACK matmuls on CPU).
TRAIN_OURS = {"ours": None, "ours_xla_default": {}}


def _with_tok_s(timing: dict, n_tokens: int, **extra) -> dict:
    """A :func:`timeit` result plus ``extra`` and tokens/s from its median."""
    return {**timing, **extra, "tok_s": n_tokens / timing["median_s"]}


def unfused_causal_lm_loss(model, batch, rng=None):
    """The plain loss for comparison: whole ``[B, T, V]`` float32 logits, then log-softmax
    (autodiff feeds the float32 logits cotangent into the head's transposed products)."""
    tokens = batch["tokens"]
    nll = -next_token_logprobs(model(tokens), tokens)
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32), {}


def _train_loss(name: str, chunk_size: int | None = None):
    if name == "unfused":
        return unfused_causal_lm_loss
    if name == "fused":
        return functools.partial(causal_lm_loss, chunk_size=chunk_size)
    raise ValueError(f"loss must be 'fused' or 'unfused', got {name!r}")


def _ours_train(cfg: ModelConfig, B: int, T: int, loss_fn=causal_lm_loss,
                compiler_options: dict | None = None) -> tuple[Callable[[], None], dict]:
    """One compiled train step as a blocking call, plus its compile time, temp memory and the XLA
    options it was compiled with (``None``: the train step's default, :func:`cpu_compiler_options`)."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tx = make_optimizer(TrainConfig(steps=1000, lr=1e-4, weight_decay=0.1))
    graphdef, state, _ = init_state(model, tx)
    del model  # the state holds copies of its arrays
    step = make_train_step(graphdef, loss_fn, tx, compiler_options=compiler_options)
    batch = {"tokens": jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, B, T)), jnp.int32)}
    key = jax.random.PRNGKey(0)
    holder = {"state": state}
    t0 = time.perf_counter()
    compiled = step.compile(state, batch, key)  # the program every call below runs
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    def one():
        holder["state"], m = step(holder["state"], batch, key)
        block(m["loss"])

    return one, {"compile_s": compile_s, "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                 "compiler_options": step.compiler_options, "onednn_matmuls": "onednn" in compiled.as_text()}


def _torch_llama(cfg: ModelConfig, state_dict: dict | None = None):
    import torch
    import transformers

    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                  intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                  max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                                  attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hc)
    if state_dict is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False)
        if cfg.tie_embeddings:
            model.tie_weights()
    return model


def _torch_train(cfg: ModelConfig, B: int, T: int) -> Callable[[], None]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_llama(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    toks = torch.from_numpy(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)))

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        # the same step as ours: global-norm clipping at 1.0 (TrainConfig's default), then AdamW
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return one


def _train_config() -> ModelConfig:
    """The train-step comparison's model: SmolLM2-135M shapes."""
    return ModelConfig.smollm2_135m(max_seq_len=2048)


def _train_in_processes(who: list[str], B: int, T: int, config: dict) -> dict[str, dict]:
    """Train-step timings with each contender alone in a fresh process, ``train_rounds`` rounds
    of one process per contender in alternation (machine drift hits all alike); per contender the
    median over all rounds' timed steps.

    Why not one process: with both in it, each one's threads disturb the other's (XLA's thread
    pool and torch's OpenMP team share the same cores); on the 2-core VM that moved the ratio by
    up to 20 %, in either direction depending on which model was built first."""
    code = ("import json, sys; from benchmarks.suites import lm; "
            "print('@@' + json.dumps(lm._train_alone(*json.loads(sys.argv[1]))))")
    args = {name: json.dumps([name, B, T, config["train_repeats"], config["train_warmup"]])
            for name in who}
    times: dict[str, list] = {name: [] for name in who}
    compile_s: dict[str, list] = {name: [] for name in who}
    info: dict[str, dict] = {name: {} for name in who}
    for _ in range(config.get("train_rounds", 1)):
        for name in who:
            out = subprocess.run([sys.executable, "-c", code, args[name]], capture_output=True,
                                 text=True, check=True).stdout
            res = json.loads(out[out.rindex("@@") + 2:])
            times[name] += res["all_s"]
            compile_s[name] += [res["compile_s"]] if "compile_s" in res else []
            info[name].update({k: res[k] for k in ("compiler_options", "onednn_matmuls", "temp_gib") if k in res})
    return {name: {"median_s": statistics.median(ts), "all_s": ts, "isolation": "process",
                   "rounds": config.get("train_rounds", 1), "repeats": config["train_repeats"],
                   **({"compile_s": statistics.median(compile_s[name])} if compile_s[name] else {}),
                   **info[name]}
            for name, ts in times.items()}


def _train_contender(who: str, cfg: ModelConfig, B: int, T: int) -> tuple[Callable[[], None], dict]:
    """A contender's train step as a blocking call, plus what it records (compile info for ours)."""
    if who == "torch":
        return _torch_train(cfg, B, T), {}
    return _ours_train(cfg, B, T, compiler_options=TRAIN_OURS[who])


def _train_alone(who: str, B: int, T: int, repeats: int, warmup: int) -> dict:
    """One contender's train step timed in this process (the worker of :func:`_train_in_processes`)."""
    one, info = _train_contender(who, _train_config(), B, T)
    return {**timeit(one, repeats=repeats, warmup=warmup), **info}


def _decode_inputs(vocab: int, batch: int, prompt_len: int):
    r = np.random.RandomState(1)
    return [r.randint(100, vocab - 1, prompt_len).tolist() for _ in range(batch)]


def _ours_decode(model, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    prompts = _decode_inputs(model.cfg.vocab_size, batch, prompt_len)
    t0 = time.perf_counter()
    generate(model, prompts, max_new_tokens=new)
    first_s = time.perf_counter() - t0
    t = timeit(lambda: generate(model, prompts, max_new_tokens=new), repeats=repeats, warmup=0)
    return _with_tok_s(t, batch * new, ms_per_step=1e3 * t["median_s"] / new, first_call_s=first_s)


def _torch_decode(hf_model, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    import torch

    prompts = torch.tensor(_decode_inputs(hf_model.config.vocab_size, batch, prompt_len))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompts))

    def one():
        with torch.no_grad():
            hf_model.generate(prompts, **kw)

    t = timeit(one, repeats=repeats, warmup=1)
    return _with_tok_s(t, batch * new, ms_per_step=1e3 * t["median_s"] / new)


def _mfu(mc: dict) -> dict:
    """Train-step throughput and MFU of one setting: ``model, batch, seq_len, remat, attn_impl,
    repeats, warmup`` and optionally ``loss`` ("fused", the default, or "unfused"),
    ``chunk_size`` and ``scan_unroll``."""
    cfg = getattr(ModelConfig, mc["model"])(compute_dtype="bfloat16", remat=mc["remat"],
                                            scan_unroll=mc.get("scan_unroll", 1),
                                            attn_impl=mc["attn_impl"], max_seq_len=mc["seq_len"])
    B, T = mc["batch"], mc["seq_len"]
    one, info = _ours_train(cfg, B, T, _train_loss(mc.get("loss", "fused"), mc.get("chunk_size")))
    res = _with_tok_s(timeit(one, repeats=mc["repeats"], warmup=mc["warmup"]), B * T, **info)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    flops_tok = cfg.train_flops_per_token(T)
    achieved = res["tok_s"] * flops_tok / 1e12
    return {**res, "device_kind": kind, "flops_per_token": flops_tok, "model_tflops": achieved,
            "peak_tflops": peak, "mfu": achieved / peak if peak else None,
            "params": cfg.matmul_params() + cfg.d_model * cfg.vocab_size * (0 if cfg.tie_embeddings else 1)}


def _mfu_sweep(base: dict, overrides: list[dict]) -> list[dict]:
    """:func:`_mfu` of ``base`` updated by each override, one after another in this process; a
    setting that fails (out of memory, say) is recorded with its error and the sweep goes on."""
    rows = []
    for ov in overrides:
        setting = {**base, **ov}
        try:
            r = _mfu(setting)
        except Exception as e:  # noqa: BLE001 - a failed setting is a result, not a crash
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append({"setting": ov, **r})
        print(f"mfu {ov}: " + (r["error"] if "error" in r else f"{r['tok_s']:.0f} tok/s, MFU {r['mfu']}"),
              flush=True)
        gc.collect()
    return rows


def run(config: dict, out_dir: pathlib.Path) -> dict:
    summary, details = [], {}
    cfg = _train_config()
    who = ["ours", "torch"] if config.get("torch") else ["ours"]
    unknown = [w for w in config.get("train_extra", []) if w not in TRAIN_OURS]
    if unknown:
        raise ValueError(f"train_extra may name {list(TRAIN_OURS)}, got {unknown}")
    who += [w for w in config.get("train_extra", []) if w not in who]
    for B, T in config.get("train_shapes", []):
        if config.get("train_isolation", "process") == "process":
            t = _train_in_processes(who, B, T, config)
        else:
            built = {name: _train_contender(name, cfg, B, T) for name in who}
            t = timeit_interleaved({name: one for name, (one, _) in built.items()},
                                   repeats=config["train_repeats"], warmup=config["train_warmup"])
            for name, (_, info) in built.items():
                t[name].update(info)
        ours = _with_tok_s(t["ours"], B * T)
        row = {"bench": f"train step {B}x{T}", "ours_tok_s": ours["tok_s"]}
        details[f"train_{B}x{T}_ours"] = ours
        if config.get("torch"):
            ref = _with_tok_s(t["torch"], B * T)
            details[f"train_{B}x{T}_torch"] = ref
            row.update(torch_tok_s=ref["tok_s"], ratio=ours["tok_s"] / ref["tok_s"])
        if "ours_xla_default" in t:
            xla = _with_tok_s(t["ours_xla_default"], B * T)
            details[f"train_{B}x{T}_ours_xla_default"] = xla
            row["ours_xla_default_tok_s"] = xla["tok_s"]
            if config.get("torch"):
                row["ratio_xla_default"] = xla["tok_s"] / row["torch_tok_s"]
        summary.append(row)

    if config.get("decode_batches"):
        name = config.get("decode_model", "smollm2")
        if name == "smollm2":
            try:
                model, _ = load("smollm2-135m-instruct", scan_unroll=1)
                weights = "SmolLM2-135M-Instruct GGUF (Q4_1 dequantized to f32)"
            except FileNotFoundError:
                model, weights = Transformer(cfg, rngs=nnx.Rngs(0)), "random (asset missing)"
        else:
            dc = getattr(ModelConfig, name)(compute_dtype=config.get("decode_dtype"), scan_unroll=1,
                                            param_dtype=config.get("decode_dtype") or "float32", max_seq_len=4096)
            model, weights = Transformer(dc, rngs=nnx.Rngs(0)), f"random {name} ({config.get('decode_dtype')})"
        details["decode_weights"] = weights
        hf_model = _torch_llama(model.cfg, hf_state_dict(model)).eval() if config.get("torch") else None
        for b in config["decode_batches"]:
            ours = _ours_decode(model, b, config["prompt_len"], config["new_tokens"], config["decode_repeats"])
            details[f"decode_b{b}_ours"] = ours
            row = {"bench": f"greedy decode b={b}", "ours_tok_s": ours["tok_s"], "ours_ms_step": ours["ms_per_step"]}
            if hf_model is not None:
                ref = _torch_decode(hf_model, b, config["prompt_len"], config["new_tokens"], config["decode_repeats"])
                details[f"decode_b{b}_torch"] = ref
                row.update(torch_tok_s=ref["tok_s"], torch_ms_step=ref["ms_per_step"], ratio=ours["tok_s"] / ref["tok_s"])
            summary.append(row)

    if "mfu" in config:
        m = _mfu(config["mfu"])
        details["mfu"] = m
        summary.append({"bench": f"MFU {config['mfu']['model']} bf16 {config['mfu']['batch']}x{config['mfu']['seq_len']}",
                        "ours_tok_s": m["tok_s"], "model_tflops": m["model_tflops"], "mfu": m["mfu"],
                        "device": m["device_kind"]})
        if config.get("mfu_sweep"):
            details["mfu_sweep"] = _mfu_sweep(config["mfu"], config["mfu_sweep"])
            for r in details["mfu_sweep"]:
                summary.append({"bench": "MFU " + " ".join(f"{k}={v}" for k, v in r["setting"].items()),
                                "ours_tok_s": r.get("tok_s"), "mfu": r.get("mfu"),
                                "temp_gib": r.get("temp_gib"), "error": r.get("error")})
    return {"summary": summary, "details": details}
