"""Preference pairs in the HH-RLHF (strings) and UltraFeedback-binarized (messages) schemas ->
chat-template token ids -> ``lmx.reward.collate_pairs`` -> one reward-model training step."""
import json

import datasets
import numpy as np
import pytest
from flax import nnx

from lmx.data import hh_messages, load_preference_pairs, split_prompt, tokenize_pairs
from lmx.models import ModelConfig, Transformer
from lmx.reward import RewardConfig, RewardModel, collate_pairs, make_head, reward_loss_fn
from lmx.train import TrainConfig, train

HH = [{"chosen": f"\n\nHuman: What is {i}+1?\n\nAssistant: It is {i + 1}.",
       "rejected": f"\n\nHuman: What is {i}+1?\n\nAssistant: I refuse."} for i in range(6)]
HH.append({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Bye!",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Bye."})


def test_split_prompt_and_hh_turns():
    p, c, r = split_prompt(HH[-1]["chosen"], HH[-1]["rejected"])
    # the common prefix runs into the reply ("Bye"), the prompt stops at the last Assistant:
    assert p.endswith("\n\nHuman: bye\n\nAssistant:") and c == " Bye!" and r == " Bye."
    assert hh_messages(p) == [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "bye"}]
    assert hh_messages("no markers here") is None


def test_hh_strings_rendered_with_chat_template(tmp_path, tok, cache):
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in HH))
    ds = load_preference_pairs(data_files=str(f), cache_dir=cache)
    pairs = tokenize_pairs(ds, tok)
    row = pairs[-1]
    text = tok.decode(row["chosen_ids"])
    assert text == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Bye!"}],
        tokenize=False)
    k = row["prompt_len"]
    assert row["chosen_ids"][:k] == row["rejected_ids"][:k]
    assert tok.decode(row["chosen_ids"][:k]).endswith("<|im_start|>assistant\n")
    # without the template the strings are tokenized as they are
    raw = tokenize_pairs(ds, tok, use_chat_template=False)[0]
    assert tok.decode(raw["chosen_ids"]) == HH[0]["chosen"]
    # streamed: the same ids, lazily
    streamed = list(tokenize_pairs(load_preference_pairs(data_files=str(f), streaming=True), tok))
    assert [r["chosen_ids"] for r in streamed] == list(pairs["chosen_ids"])
    assert [r["prompt_len"] for r in streamed] == list(pairs["prompt_len"])


def test_ultrafeedback_messages_train_one_reward_step(tmp_path, tok, cache):
    rows = {"prompt": [], "chosen": [], "rejected": [], "score_chosen": []}
    for i in range(8):
        q = f"Name a number after {i}."
        rows["prompt"].append(q)
        rows["chosen"].append([{"role": "user", "content": q},
                               {"role": "assistant", "content": str(i + 1)}])
        rows["rejected"].append([{"role": "user", "content": q},
                                 {"role": "assistant", "content": "no"}])
        rows["score_chosen"].append(8.0)
    f = tmp_path / "uf.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(f))
    pairs = tokenize_pairs(load_preference_pairs(str(f), cache_dir=cache), tok)
    assert pairs.column_names == ["prompt", "score_chosen", "chosen_ids", "rejected_ids",
                                  "prompt_len"]
    assert tok.decode(pairs[3]["chosen_ids"]).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    batch, kept = collate_pairs(list(pairs["chosen_ids"]), list(pairs["rejected_ids"]), eos_id=eos,
                                pad_id=0, max_len=64)
    assert kept.tolist() == list(range(8))
    cfg = ModelConfig.tiny_llama(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2,
                                 n_kv_heads=1, d_ff=64, max_seq_len=64)
    rc = RewardConfig(head="scalar")
    rngs = nnx.Rngs(0)
    rm = RewardModel(Transformer(cfg, rngs=rngs), make_head(rc, cfg.d_model, rngs=rngs), rc)
    res = train(rm, reward_loss_fn, lambda s: batch, TrainConfig(steps=1, progress=False))
    assert len(res.losses) == 1 and np.isfinite(res.losses[0])
    assert 0.0 <= res.history[0]["acc"] <= 1.0


def test_wrong_preference_schema_fails_before_tokenizing(tmp_path, cache):
    class NoCalls:
        chat_template = "x"

        def __call__(self, *a, **k):
            raise AssertionError("tokenized before the schema check")

        apply_chat_template = __call__

    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(TypeError, match="'chosen' has type Value\\('int64'\\)"):
        load_preference_pairs(data_files=str(f), cache_dir=cache)
    g = tmp_path / "half.jsonl"
    g.write_text(json.dumps({"chosen": [{"role": "user", "content": "q"}],
                             "rejected": [{"role": "user", "content": "q"}]}) + "\n")
    ds = datasets.load_dataset("json", data_files=str(g), split="train", cache_dir=cache)
    with pytest.raises(ValueError, match="lacks column\\(s\\) \\['prompt'\\]"):
        tokenize_pairs(ds, NoCalls())
    h = tmp_path / "none.csv"
    h.write_text("good,bad\na,b\n")
    with pytest.raises(ValueError, match="expected \\{chosen: string"):
        load_preference_pairs(str(h), cache_dir=cache)
