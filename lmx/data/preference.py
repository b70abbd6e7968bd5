"""Preference pairs for reward models, in the two schemas the field uses.

* **strings** (Anthropic HH-RLHF, Bai et al. 2022, arXiv:2204.05862): ``{chosen: string,
  rejected: string}``, each a whole transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.
  The shared prompt is the common prefix of the two, cut back to its last
  ``"\\n\\nAssistant:"`` (TRL's ``extract_prompt`` does the same), so each side keeps its own
  full reply.
* **messages** (UltraFeedback-binarized, Tunstall et al. 2023, arXiv:2310.16944):
  ``{prompt: string, chosen: list of {role, content}, rejected: list of {role, content}}``, each
  list the whole conversation ending in the assistant's reply.

:func:`tokenize_pairs` renders both with the tokenizer's chat template (HH transcripts are first
parsed into ``user``/``assistant`` turns) and gives ``chosen_ids`` / ``rejected_ids`` (prompt +
reply ids, no EOS: ``lmx.reward.collate_pairs`` appends it) and ``prompt_len`` (ids of the shared
prompt with the assistant header).
"""
from __future__ import annotations

import re
from typing import Any

from lmx.data._load import Column, check_schema, first_example, is_stream, open_split
from lmx.data.text import render_chat

STRING_SCHEMA = [Column("chosen", "string"), Column("rejected", "string")]
MESSAGES_SCHEMA = [Column("prompt", "string"), Column("chosen", "messages"),
                   Column("rejected", "messages")]
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def pair_schema(ds) -> str:
    """``"strings"`` or ``"messages"`` from the type of ``chosen`` (features, else first row).

    Raises:
      ValueError: no ``chosen``/``rejected`` columns. TypeError: ``chosen`` is neither kind.
    """
    from lmx.data._load import feature_matches, value_matches

    names = list(ds.features) if ds.features is not None else list(first_example(ds))
    if "chosen" not in names or "rejected" not in names:
        raise ValueError(f"preference dataset has columns {names}; expected {{chosen: string, "
                         "rejected: string}} (HH-RLHF) or {prompt: string, chosen: list of "
                         "{role, content}, rejected: list of {role, content}} (UltraFeedback)")
    if ds.features is not None:
        f = ds.features["chosen"]
        is_str, is_msgs = feature_matches(f, "string"), feature_matches(f, "messages")
    else:
        v = first_example(ds)["chosen"]
        is_str, is_msgs = value_matches(v, "string"), value_matches(v, "messages")
    if is_str:
        check_schema(ds, STRING_SCHEMA, "preference (strings)")
        return "strings"
    if is_msgs:
        check_schema(ds, MESSAGES_SCHEMA, "preference (messages)")
        return "messages"
    got = ds.features["chosen"] if ds.features is not None else type(v).__name__
    raise TypeError(f"preference column 'chosen' has type {got}; expected string (HH-RLHF) or "
                    "list of {role: string, content: string} (UltraFeedback-binarized)")


def load_preference_pairs(source: Any = None, *, split: str = "train", data_files: Any = None,
                          name: str | None = None, streaming: bool = False, **kw):
    """A preference split in either schema, checked (see :func:`pair_schema`) and cut to this
    process's part (:func:`lmx.data.open_split`)."""
    ds = open_split(source, split=split, data_files=data_files, name=name, streaming=streaming,
                    **kw)
    pair_schema(ds)
    return ds


def split_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen reply, rejected reply)`` of an HH-style string pair.

    The prompt is the common prefix cut back to (and including) its last ``"\\n\\nAssistant:"``;
    without that marker it is the whole common character prefix.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(HH_ASSISTANT)
    k = cut + len(HH_ASSISTANT) if cut >= 0 else n
    return chosen[:k], chosen[k:], rejected[k:]


def hh_messages(prompt: str) -> list[dict] | None:
    """HH ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> user/assistant
    turns (the trailing empty assistant turn dropped); None when the text is not in that form."""
    parts = _HH_TURN.split(prompt)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs = msgs[:-1]
    return msgs if msgs and msgs[-1]["role"] == "user" else None


def tokenize_pairs(ds, tokenizer: Any, *, use_chat_template: bool | None = None,
                   batch_size: int = 1000):
    """Pairs -> ``{chosen_ids, rejected_ids: list of int, prompt_len: int}`` plus the dataset's
    other columns (``map(batched=True)``, cached for map-style input, lazy for streams).

    ``use_chat_template``: default = whether the tokenizer has one. Message pairs always need it;
    HH strings without it are tokenized as they are. The schema is checked before any
    tokenization.

    Raises:
      ValueError: message pairs with a tokenizer lacking a chat template; a conversation whose
        last turn is not the assistant's (names the row).
    """
    schema = pair_schema(ds)
    templ = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None \
        else use_chat_template
    if schema == "messages" or templ:
        render_chat(tokenizer, [{"role": "user", "content": ""}])  # fails early without one

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_conv(msgs: list[dict], row: int, side: str) -> tuple[list[int], list[int]]:
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"row {row}: {side} must end with an assistant turn, got roles "
                             f"{[m['role'] for m in msgs]}")
        full = ids(render_chat(tokenizer, msgs))
        prompt = ids(render_chat(tokenizer, msgs[:-1], add_generation_prompt=True))
        return full, prompt

    def encode(batch, idx):
        out = {"chosen_ids": [], "rejected_ids": [], "prompt_len": []}
        for j, row in enumerate(idx):
            c, r = batch["chosen"][j], batch["rejected"][j]
            if schema == "strings":
                prompt, rc, rr = split_prompt(c, r)
                turns = hh_messages(prompt) if templ else None
                if turns is None:
                    pc, cc, cr = ids(prompt), ids(rc), ids(rr)
                    out["chosen_ids"].append(pc + cc)
                    out["rejected_ids"].append(pc + cr)
                    out["prompt_len"].append(len(pc))
                    continue
                c = turns + [{"role": "assistant", "content": rc.strip()}]
                r = turns + [{"role": "assistant", "content": rr.strip()}]
            fc, pc = encode_conv(c, row, "chosen")
            fr, _ = encode_conv(r, row, "rejected")
            out["chosen_ids"].append(fc)
            out["rejected_ids"].append(fr)
            out["prompt_len"].append(len(pc))
        return out

    kw = {"desc": "tokenize pairs"} if not is_stream(ds) else {}
    # other columns (prompt, scores, ids) stay: margins and filters are built from them
    return ds.map(encode, batched=True, batch_size=batch_size, with_indices=True,
                  remove_columns=["chosen", "rejected"], **kw)
