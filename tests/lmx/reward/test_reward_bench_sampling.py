"""The reward benchmark's generation batching (``benchmarks/suites/reward.py::sample_set``):
every ``generate`` call has exactly ``batch`` rows (one compile per prompt bucket), prompts are cut
to ``prompt_max_tokens``, extra rows are dropped and results are cached."""
import numpy as np

import lmx.models
from benchmarks.suites import reward as suite


class _Tokenizer:
    eos_token_id = 0

    def encode(self, text):
        return [len(w) + 1 for w in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_sample_set_full_batches_cut_prompts_and_cache(tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, prompts, *, max_new_tokens, temperature, stop_tokens, pad_id, seed):
        calls.append([list(p) for p in prompts])
        # one new token per row, unique across calls: the row's global position
        return [[100 + seed % 100_003 + i] for i in range(len(prompts))]

    monkeypatch.setattr(lmx.models, "generate", fake_generate)
    prompts = ["a bb ccc dddd eeeee", "ff g"]
    kw = {"max_new": 3, "temperature": 1.0, "seed": 0, "batch": 4, "cache": tmp_path, "tag": "t",
          "features": False, "prompt_max_tokens": 3, "progress": False}
    out = suite.sample_set(None, _Tokenizer(), prompts, 3, **kw)
    assert [len(c) for c in calls] == [4, 4]  # 6 jobs -> 4 + (2 real + 2 fill) rows
    assert calls[0][0] == [2, 3, 4]  # 5-token prompt cut to its first 3 tokens
    assert calls[1][2:] == [calls[1][1]] * 2  # fill rows repeat the last real job
    assert out["texts"] == ["100", "101", "102", "103", "104", "105"]
    assert out["timing"]["n"] == 6 and out["timing"]["max_prompt_tokens"] == 3
    assert "features" not in out
    again = suite.sample_set(None, _Tokenizer(), prompts, 3, **kw)
    assert len(calls) == 2 and again["texts"] == out["texts"]  # served from the cache


def test_sample_key_separates_feature_and_prompt_settings():
    base = {"prompts": ["x"], "per_prompt": 2, "max_new": 4, "temperature": 1.0, "seed": 1,
            "features": False, "prompt_max_tokens": 16, "batch": 64}
    keys = {suite._sample_key(**base), suite._sample_key(**{**base, "features": True}),
            suite._sample_key(**{**base, "prompt_max_tokens": None}),
            suite._sample_key(**{**base, "batch": 32})}
    assert len(keys) == 4
    assert np.unique([len(k) for k in keys]).tolist() == [16]
