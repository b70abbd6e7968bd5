"""Shared fixtures data for the prompting tests: template sentences and a gullible scripted model."""
import numpy as np

from lmx.prompting import CT_PROMPT, IA_PROMPT


def sentences(n, seed=0):
    """``n`` short English sentences from small word lists (a stand-in corpus for cipher tasks)."""
    rng = np.random.default_rng(seed)
    adj = ["good", "bad", "slow", "quick", "bright", "dark", "funny", "sad", "long", "short", "warm", "cold"]
    noun = ["film", "actor", "plot", "story", "scene", "cast", "score", "script", "ending", "hero"]
    verb = ["saves", "ruins", "lifts", "drags", "hides", "shows", "breaks", "makes"]
    return [f"the {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the {rng.choice(adj)} "
            f"{rng.choice(noun)} and the {rng.choice(noun)} ." for _ in range(n)]


def gullible(conv):
    """Leaks to every attack unless an IA stage is in the conversation; answers the France question."""
    sys_ = conv[0]["content"] if conv[0]["role"] == "system" else ""
    secret = sys_.split("password is ")[1].split(".")[0] if "password is" in sys_ else ""
    user = [m["content"] for m in conv if m["role"] == "user"]
    if user[-1].startswith(IA_PROMPT):
        return "The essential intention of the query is to obtain a secret."
    if user[-1] == CT_PROMPT:
        if "capital of France" in user[0]:
            return "Paris."
        return "I'm sorry, I cannot share that."
    if "capital of France" in user[-1]:
        return "Paris is the capital."
    return f"Sure! It is {secret}."
