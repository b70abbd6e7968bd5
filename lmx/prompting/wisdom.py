"""WisdoM: context generation + training-free contextual fusion (Wang et al., ACM MM 2024).

arXiv:2401.06659. The prompts, the class probabilities and the fusion rule follow the official code
(github ``DreamMr/WisdoM``: the LLaVA demo ``run.py`` and the MSED evaluation under ``eval/``).
Three stages:

1. a context prompt (the demo's template) asks a (vision-)LM for background knowledge about the
   image and sentence; images travel as OpenAI ``image_url`` content parts, a text-only path
   drops them;
2. the downstream classifier runs twice per sample, without (p) and with (q) the context; class
   probabilities are the first-token probabilities of the option letters (the MSED evaluation's
   MMICL mode);
3. contextual fusion: margin ``m = p_(1) - p_(2)`` (top-1 minus top-2 of p); if ``m > tau``
   keep p, else use ``p + lam * (q - p)``; predict the argmax.
"""
from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.backends.base import ChatBackend, LabelProbBackend

CONTEXT_TEMPLATES: dict[str, str] = {
    # verified: the official demo's template
    "historical_background": (
        'Give you an image and sentence, you can provide historical context, important events, '
        'and relevant background information related to the image and sentence. '
        'Sentence: "{sentence}"'),
    # lmx text-only adaptation of the same template (no image to talk about)
    "historical_background_text": (
        'Give you a sentence, you can provide historical context, important events, and relevant '
        'background information related to the sentence. Sentence: "{sentence}"'),
}

SENTIMENT3 = ("positive", "neutral", "negative")
SENTIMENT2 = ("positive", "negative")


def wisdom_context_prompt(sentence: str, template_id: str = "historical_background",
                          template: str | None = None) -> str:
    """The context-generation instruction for ``sentence`` (registry id or an explicit template
    with a ``{sentence}`` field)."""
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a string, got {type(sentence).__name__}")
    if template is None:
        if template_id not in CONTEXT_TEMPLATES:
            raise ValueError(f"unknown template_id {template_id!r}; known: {sorted(CONTEXT_TEMPLATES)}")
        template = CONTEXT_TEMPLATES[template_id]
    if "{sentence}" not in template:
        raise ValueError("template must contain a '{sentence}' field")
    return template.replace("{sentence}", sentence)


def user_message(text: str, image_url: str | None = None) -> dict:
    """A user turn; with an image: OpenAI content parts ``[image_url, text]``."""
    if image_url is None:
        return {"role": "user", "content": text}
    if not isinstance(image_url, str) or not image_url:
        raise ValueError(f"image_url must be a non-empty string (http(s) or data: URL), got {image_url!r}")
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def context_messages(sentence: str, image_url: str | None = None,
                     template_id: str | None = None) -> list[dict]:
    """Context-generation conversation; the template defaults to the image or text-only variant."""
    tid = template_id or ("historical_background" if image_url else "historical_background_text")
    return [user_message(wisdom_context_prompt(sentence, tid), image_url)]


def _letters(options: Sequence[str]) -> list[str]:
    if not 2 <= len(options) <= 26:
        raise ValueError(f"options must hold 2..26 labels, got {len(options)}")
    return list(string.ascii_uppercase[:len(options)])


def classification_prompt(sentence: str, options: Sequence[str] = SENTIMENT3,
                          context: str | None = None, *, aspect: str | None = None,
                          with_image: bool = False) -> str:
    """Multiple-choice sentiment prompt (official code layouts), sentence- or aspect-level.

    Sentence level (MSED layout without MMICL's image-placeholder tokens):
    ``Sentence: "<s>".`` [+ `` Context: "<ctx>". Using the context as a textual aids to help you
    answer the question.``] [+ `` Use the image as a visual aids to help you answer the
    question.``] + `` Question: according to the [image and ]sentence, what is the sentiment
    polarity? Choose from the following options:`` + one ``X).label`` line per option + a blank
    line + ``Answer: ``. Aspect level (LLaVA demo layout): ``Sentence: "<s>"`` [``. Context:
    "<ctx>".``] + image sentence + ``What is the sentiment polarity of the aspect "<a>" in the
    sentence?`` + ``X). label`` lines + ``Answer with the option's letter from the given choices
    directly.``, newline separated.
    """
    letters = _letters(options)
    if aspect is not None:
        head = f'Sentence: "{sentence}"' + (f'. Context: "{context}".' if context is not None else "")
        parts = [head]
        if with_image:
            parts.append("Use the image as a visual aids to help you answer the question.")
        parts.append(f'What is the sentiment polarity of the aspect "{aspect}" in the sentence?')
        parts += [f"{k}). {o}" for k, o in zip(letters, options)]
        parts.append("Answer with the option's letter from the given choices directly.")
        return "\n".join(parts)
    out = f'Sentence: "{sentence}".'
    if context is not None:
        out += f' Context: "{context}". Using the context as a textual aids to help you answer the question.'
    if with_image:
        out += " Use the image as a visual aids to help you answer the question."
    src = "image and sentence" if with_image else "sentence"
    out += (f" Question: according to the {src}, what is the sentiment polarity? "
            "Choose from the following options:\n")
    out += "".join(f"{k}).{o}\n" for k, o in zip(letters, options))
    return out + "\nAnswer: "


def contextual_fusion(p, q, tau: float, lam: float):
    """Fuse no-context ``p`` and with-context ``q`` probabilities (the official code's rule).

    Args: p, q float [B, C] (or [C]); tau threshold; lam interpolation weight.
    Returns (fused float32 [B, C], hard bool [B]): ``hard = (p_(1) - p_(2)) <= tau`` (ties at tau
    fuse, strict ``>`` keeps p), ``fused = where(hard, p + lam * (q - p), p)``.
    Raises ValueError on mismatched shapes or fewer than 2 classes.
    """
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    if p.shape != q.shape or p.ndim not in (1, 2) or p.shape[-1] < 2:
        raise ValueError(f"p and q must share a shape [B, C] or [C] with C >= 2; got {p.shape}, {q.shape}")
    top2 = jax.lax.top_k(p, 2)[0]
    margin = top2[..., 0] - top2[..., 1]
    hard = ~(margin > tau)
    fused = jnp.where(hard[..., None], p + lam * (q - p), p)
    return fused, hard


@dataclasses.dataclass(frozen=True)
class WisdomOutput:
    """p (no context), q (with context), fused probabilities, the hard-sample flag, predictions."""

    p: np.ndarray
    q: np.ndarray
    fused: np.ndarray
    hard: np.ndarray
    pred: np.ndarray
    contexts: tuple[str, ...]


def generate_contexts(backend: ChatBackend, sentences: Sequence[str],
                      images: Sequence[str | None] | None = None, *, template_id: str | None = None,
                      max_tokens: int = 1024, temperature: float = 0.2, top_p: float = 0.5,
                      seed: int = 0) -> list[str]:
    """Stage 2: one backend call for all context prompts (the demo's decoding: T 0.2, top-p 0.5)."""
    images = [None] * len(sentences) if images is None else list(images)
    if len(images) != len(sentences):
        raise ValueError(f"images ({len(images)}) and sentences ({len(sentences)}) differ in length")
    convs = [context_messages(s, im, template_id) for s, im in zip(sentences, images)]
    return backend.chat(convs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def score_options(backend: LabelProbBackend, sentences: Sequence[str], options: Sequence[str],
                  contexts: Sequence[str] | None = None, images: Sequence[str | None] | None = None,
                  *, aspects: Sequence[str] | None = None) -> np.ndarray:
    """float32 [B, C]: option-letter probabilities from ``backend.label_probs`` (first-token mode)."""
    n = len(sentences)
    images = [None] * n if images is None else list(images)
    ctx = [None] * n if contexts is None else list(contexts)
    asp = [None] * n if aspects is None else list(aspects)
    if not len(images) == len(ctx) == len(asp) == n:
        raise ValueError("sentences, contexts, images and aspects must have the same length")
    convs = [[user_message(classification_prompt(s, options, c, aspect=a, with_image=im is not None), im)]
             for s, c, a, im in zip(sentences, ctx, asp, images)]
    return np.asarray(backend.label_probs(convs, _letters(options)), np.float32)


def wisdom_predict(backend, sentences: Sequence[str], *, options: Sequence[str] = SENTIMENT3,
                   contexts: Sequence[str] | None = None, images: Sequence[str | None] | None = None,
                   aspects: Sequence[str] | None = None, tau: float = 0.3, lam: float = 0.4,
                   context_backend: ChatBackend | None = None, context_kwargs: dict | None = None
                   ) -> WisdomOutput:
    """Full WisdoM: contexts (generated by ``context_backend`` or ``backend`` when not given),
    the two scoring passes and the fusion. Defaults tau = 0.3, lam = 0.4 are the demo's."""
    if contexts is None:
        contexts = generate_contexts(context_backend or backend, sentences, images,
                                     **(context_kwargs or {}))
    p = score_options(backend, sentences, options, None, images, aspects=aspects)
    q = score_options(backend, sentences, options, contexts, images, aspects=aspects)
    fused, hard = contextual_fusion(p, q, tau, lam)
    fused = np.asarray(fused)
    return WisdomOutput(p, q, fused, np.asarray(hard), fused.argmax(-1), tuple(contexts))


def tune_fusion(p, q, labels, taus: Sequence[float], lams: Sequence[float]) -> dict:
    """Grid-search (tau, lam) for accuracy on validation data: the official code uses
    different (tau, lam) per dataset (demo 0.3/0.4, MSED 0.79/0.85) and does not say how they were
    tuned. Ties keep the first grid point (taus outer, lams inner)."""
    labels = np.asarray(labels)
    best = None
    for t in taus:
        for lam in lams:
            acc = float((np.asarray(contextual_fusion(p, q, t, lam)[0]).argmax(-1) == labels).mean())
            if best is None or acc > best["accuracy"]:
                best = {"tau": float(t), "lam": float(lam), "accuracy": acc}
    if best is None:
        raise ValueError("taus and lams must be non-empty")
    return best
