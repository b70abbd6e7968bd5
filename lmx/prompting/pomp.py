"""POMP: probability-driven meta-graph prompting for low-resource unsupervised MT.

Pan et al., ACL 2024 (arXiv:2401.05596). The paper's abstract gives the method (a per-language
meta-graph whose vertex probabilities are learned from BLEURT rewards); the exact rules below are
those of the official code, github ``slpanir/POMP``: ``refine.py`` in
``graph-of-thoughts/examples/translation_refine/`` (sampling, credit, update, inference) and
``encoder_outs.py`` (language similarity). The graph logic is pure and jit-able (fixed-shape
masks); LLM and metric calls are host-side behind :class:`~lmx.backends.base.ChatBackend` and a
scorer callable.

Math (official code), for auxiliary languages a = 0..A-1 in similarity order (highest first):

* init: ``p_a = exp(cos(LRL, a) - 1)``.
* sampling: keep a with probability p_a (Bernoulli) -> kept list S; candidate groups are the
  contiguous windows of S of length 2..max_group; a window g is kept with probability
  ``(prod_{a in g} p_a)^(1/|g|)``. Generate nodes = S, Aggregate nodes = kept windows.
* credit: ``r_a = 1/(|g|-1) * sum_{b in g, b != a} (S_g - s_b)`` (S_g aggregate score, s_b the
  Generate score of b).
* update: ``r~ = eta * f(r)``, ``f(x) = x * sigmoid(-|x|)``; skip when ``|r~| >= 0.1``; else
  ``p_a <- min(1, p_a * (1 + r~/2))``; groups in window order; ``eta <- 0.9 * eta`` per sentence.
* inference: one fixed graph (the last sampled in training) for every test sentence; output =
  the best-scored candidate over all Generate and Aggregate nodes.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.backends.base import ChatBackend

Scorer = Callable[[Sequence[str], "MTExample"], Sequence[float]]


# ---------------------------------------------------------------------------------- pure math
def init_probs(cos_sim, clip: tuple[float, float] | None = None) -> jax.Array:
    """float32 [A]: ``exp(cos - 1)``, the official code's initial vertex probabilities; optionally
    clipped into ``clip = (lo, hi)``."""
    c = jnp.asarray(cos_sim, jnp.float32)
    if c.ndim != 1 or c.shape[0] < 1:
        raise ValueError(f"cos_sim must be a non-empty 1-D array [A], got shape {c.shape}")
    p = jnp.exp(c - 1.0)
    return jnp.clip(p, *clip) if clip is not None else p


def window_table(n_aux: int, max_group: int | None = 3) -> np.ndarray:
    """int32 [W, 2]: rank windows ``[i, j)`` over the kept list, lengths 2..max_group.

    Ordered by start, then length (the order groups are updated in). ``max_group=None`` = no cap.
    """
    if not isinstance(n_aux, int) or n_aux < 1:
        raise ValueError(f"n_aux must be an int >= 1, got {n_aux!r}")
    top = n_aux if max_group is None else max_group
    if not isinstance(top, int) or top < 2:
        raise ValueError(f"max_group must be an int >= 2 or None, got {max_group!r}")
    rows = [(i, i + n) for i in range(n_aux) for n in range(2, top + 1) if i + n <= n_aux]
    return np.asarray(rows, np.int32).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class GraphMasks:
    """A sampled meta-graph as fixed-shape masks: ``gen`` bool [A], ``groups`` bool [W, A]
    (membership of each candidate window), ``on`` bool [W] (window valid and kept)."""

    gen: jax.Array
    groups: jax.Array
    on: jax.Array


jax.tree_util.register_dataclass(GraphMasks, data_fields=["gen", "groups", "on"], meta_fields=[])


def sample_graph(key: jax.Array, p, max_group: int | None = 3) -> GraphMasks:
    """Sample Generate nodes and Aggregate groups from probabilities ``p`` [A] (as refine.py).

    The window test is rank based: after the Bernoulli draw, kept positions get ranks
    ``cumsum(kept) - 1``; window ``[i, j)`` contains the kept positions with rank in it and is
    valid iff ``j <= #kept`` (so its members are contiguous in S). Jit-able for a static A.
    """
    p = jnp.asarray(p, jnp.float32)
    if p.ndim != 1:
        raise ValueError(f"p must be 1-D [A], got shape {p.shape}")
    table = jnp.asarray(window_table(p.shape[0], max_group))
    k_keep, k_grp = jax.random.split(key)
    kept = jax.random.uniform(k_keep, p.shape) < p
    rank = jnp.cumsum(kept) - 1
    lo, hi = table[:, 0:1], table[:, 1:2]
    groups = kept[None, :] & (rank[None, :] >= lo) & (rank[None, :] < hi)
    valid = table[:, 1] <= jnp.sum(kept)
    size = (table[:, 1] - table[:, 0]).astype(jnp.float32)
    logp = jnp.sum(jnp.where(groups, jnp.log(jnp.maximum(p, 1e-30))[None, :], 0.0), axis=1)
    keep = jax.random.uniform(k_grp, (table.shape[0],)) < jnp.exp(logp / size)
    return GraphMasks(kept, groups & valid[:, None], valid & keep)


def credit(groups, gen_scores, agg_scores) -> jax.Array:
    """float32 [W, A]: leave-one-out credit ``r_a = S_g - mean_{b in g, b != a} s_b`` (refine.py).

    ``groups`` bool [W, A]; ``gen_scores`` [A]; ``agg_scores`` [W]. Zero outside each group
    and for groups with fewer than 2 members.
    """
    g = jnp.asarray(groups, bool)
    s = jnp.asarray(gen_scores, jnp.float32)
    S = jnp.asarray(agg_scores, jnp.float32)
    if g.ndim != 2 or s.shape != (g.shape[1],) or S.shape != (g.shape[0],):
        raise ValueError(f"shapes must be groups [W, A], gen_scores [A], agg_scores [W]; got "
                         f"{g.shape}, {s.shape}, {S.shape}")
    size = jnp.sum(g, axis=1).astype(jnp.float32)
    total = jnp.sum(jnp.where(g, s[None, :], 0.0), axis=1)
    others = (total[:, None] - s[None, :]) / jnp.maximum(size - 1.0, 1.0)[:, None]
    return jnp.where(g & (size[:, None] >= 2), S[:, None] - others, 0.0)


def squash(x) -> jax.Array:
    """``f(x) = x * sigmoid(-|x|)``: odd, bounded by ~0.278 (at |x| ~ 1.28), -> 0 for large |x|."""
    x = jnp.asarray(x, jnp.float32)
    return x * jax.nn.sigmoid(-jnp.abs(x))


def update(p, eta, r, groups, on, *, guard: float = 0.1, decay: float = 0.9):
    """One sentence's probability update (refine.py) -> ``(p_new [A], eta_new, n_skipped)``.

    Groups are applied in window order with ``lax.scan`` (a language in two groups is updated
    twice); per member ``r~ = eta * f(r)``; ``|r~| >= guard`` skips that member's update;
    otherwise ``p <- min(1, p * (1 + r~/2))``. Languages outside every kept group are untouched.
    """
    p = jnp.asarray(p, jnp.float32)
    r = jnp.asarray(r, jnp.float32)
    groups = jnp.asarray(groups, bool)
    on = jnp.asarray(on, bool)
    if r.shape != groups.shape or r.shape[1:] != p.shape or on.shape != r.shape[:1]:
        raise ValueError(f"shapes must be p [A], r/groups [W, A], on [W]; got {p.shape}, "
                         f"{r.shape}, {groups.shape}, {on.shape}")
    eta = jnp.asarray(eta, jnp.float32)

    def step(carry, xs):
        p, skipped = carry
        r_w, g_w, on_w = xs
        rt = eta * squash(r_w)
        active = g_w & on_w
        ok = active & (jnp.abs(rt) < guard)
        p = jnp.where(ok, jnp.minimum(1.0, p * (1.0 + rt / 2.0)), p)
        return (p, skipped + jnp.sum(active & ~ok)), None

    (p_new, skipped), _ = jax.lax.scan(step, (p, jnp.int32(0)), (r, groups, on))
    return p_new, eta * decay, skipped


# ---------------------------------------------------------------------------------- graphs
@dataclasses.dataclass(frozen=True)
class Graph:
    """A concrete meta-graph: Generate languages and Aggregate groups (language codes)."""

    gen: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        missing = {a for g in self.groups for a in g} - set(self.gen)
        if missing:
            raise ValueError(f"groups use languages without a Generate node: {sorted(missing)}")
        if any(len(g) < 2 for g in self.groups):
            raise ValueError(f"groups must have >= 2 languages, got {self.groups}")

    @classmethod
    def from_masks(cls, langs: Sequence[str], masks: GraphMasks) -> Graph:
        gen = np.asarray(masks.gen)
        grp = np.asarray(masks.groups)
        on = np.asarray(masks.on)
        return cls(tuple(a for a, k in zip(langs, gen) if k),
                   tuple(tuple(a for a, m in zip(langs, row) if m) for row, o in zip(grp, on) if o))

    def to_json(self) -> str:
        return json.dumps({"gen": list(self.gen), "groups": [list(g) for g in self.groups]})

    @classmethod
    def from_json(cls, text: str) -> Graph:
        d = json.loads(text)
        return cls(tuple(d["gen"]), tuple(tuple(g) for g in d["groups"]))


# ---------------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class MTExample:
    """A source sentence with its NMT English hypothesis ``nmt`` (e0) and its NMT translations into
    the auxiliary languages (``aux[code]``). ``reference`` is optional (demos: the refined line)."""

    source: str
    nmt: str
    aux: Mapping[str, str]
    reference: str | None = None


def _line(tag: str, text: str) -> str:
    return f"<{tag}>: {text}\n"


def generate_prompt(ex: MTExample, aux: str, demos: Sequence[MTExample], lrl: str,
                    names: Mapping[str, str]) -> str:
    """Few-shot Generate prompt for one auxiliary language (the official code's prompt layout).

    Per demo: ``<L source>: s`` / ``<A translation>: a`` / ``<English translation>: e0`` /
    ``<Refined translation>: r`` and a blank line; the query stops after ``<Refined translation>:``.
    """
    L, A = names[lrl], names[aux]
    out = "".join(_line(f"{L} source", d.source) + _line(f"{A} translation", d.aux[aux])
                  + _line("English translation", d.nmt) + _line("Refined translation", _ref(d)) + "\n"
                  for d in demos)
    return (out + _line(f"{L} source", ex.source) + _line(f"{A} translation", ex.aux[aux])
            + _line("English translation", ex.nmt) + "<Refined translation>:")


def aggregate_prompt(ex: MTExample, group: Sequence[str], english: str, demos: Sequence[MTExample],
                     lrl: str, names: Mapping[str, str]) -> str:
    """Few-shot Aggregate prompt: one ``<A_k translation>:`` line per language of ``group`` (in
    order); the query's English line holds ``english`` (the best Generate output)."""
    L = names[lrl]

    def block(e: MTExample, eng: str) -> str:
        return (_line(f"{L} source", e.source)
                + "".join(_line(f"{names[a]} translation", e.aux[a]) for a in group)
                + _line("English translation", eng))

    out = "".join(block(d, d.nmt) + _line("Refined translation", _ref(d)) + "\n" for d in demos)
    return out + block(ex, english) + "<Refined translation>:"


def _ref(d: MTExample) -> str:
    if d.reference is None:
        raise ValueError("demonstrations need a reference (the refined line)")
    return d.reference


def parse_reply(text: str) -> str:
    """The first non-empty line of the LLM reply, stripped ('' if none)."""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


# ---------------------------------------------------------------------------------- scorers
def chrf(hyp: str, ref: str) -> float:
    """Sentence chrF (sacrebleu defaults: char 6-grams, beta 2) in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_chrf(hyp, [ref]).score / 100.0


def bleu(hyp: str, ref: str) -> float:
    """Sentence BLEU (sacrebleu, exp smoothing) in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_bleu(hyp, [ref]).score / 100.0


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus chrF and BLEU (sacrebleu, 0..100)."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"hyps ({len(hyps)}) and refs ({len(refs)}) differ in length")
    return {"chrf": sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score,
            "bleu": sacrebleu.corpus_bleu(list(hyps), [list(refs)], force=True).score}


@dataclasses.dataclass(frozen=True)
class ConsensusScorer:
    """Reference-free score (the official code's training and test scorer, with BLEURT replaced
    by ``sim``): each candidate's score is the mean ``sim(ref=candidate, hyp=other)`` over the
    other candidates of its Score node.

    A node with one candidate has no others; lmx then compares it with the NMT hypothesis e0.
    """

    sim: Callable[[str, str], float] = chrf

    def __call__(self, cands: Sequence[str], ex: MTExample) -> list[float]:
        cands = list(cands)
        if len(cands) == 1:
            return [float(self.sim(ex.nmt, cands[0]))]
        return [float(np.mean([self.sim(o, c) for j, o in enumerate(cands) if j != i]))
                for i, c in enumerate(cands)]


@dataclasses.dataclass(frozen=True)
class ReferenceScorer:
    """``metric(candidate, reference)``: the code's non-pseudo path (true references); with
    ``pseudo=True`` the NMT hypothesis stands in for the reference."""

    metric: Callable[[str, str], float] = chrf
    pseudo: bool = False

    def __call__(self, cands: Sequence[str], ex: MTExample) -> list[float]:
        ref = ex.nmt if self.pseudo else ex.reference
        if ref is None:
            raise ValueError("ReferenceScorer needs examples with a reference (or pseudo=True)")
        return [float(self.metric(c, ref)) for c in cands]


# ---------------------------------------------------------------------------------- pipeline
@dataclasses.dataclass(frozen=True)
class POMPConfig:
    """Pipeline settings: the LRL code, language names, few-shot demos and decoding."""

    lrl: str
    names: Mapping[str, str]
    demos: tuple[MTExample, ...]
    max_group: int | None = 3
    guard: float = 0.1
    decay: float = 0.9
    max_tokens: int = 64
    temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class SentenceResult:
    """Everything one graph run produced for a sentence; ``output`` is the best candidate."""

    output: str
    gen: tuple[tuple[str, str, float], ...]          # (lang, text, score)
    agg: tuple[tuple[tuple[str, ...], str, float], ...]  # (group, text, score)


def _score_node(texts: list[str], ex: MTExample, scorer: Scorer) -> tuple[list[str], list[float]]:
    if not texts:
        return [], []
    texts = [t if t else ex.nmt for t in texts]
    scores = [float(s) for s in scorer(texts, ex)]
    # a negative score means the LLM output is unusable: fall back to the NMT hypothesis (code)
    return [ex.nmt if s < 0 else t for t, s in zip(texts, scores)], scores


def run_graphs(backend: ChatBackend, examples: Sequence[MTExample], graphs: Sequence[Graph],
               cfg: POMPConfig, scorer: Scorer) -> list[SentenceResult]:
    """Execute one graph per example, batched: one backend call for every Generate prompt of every
    example, then one for every Aggregate prompt. Output = argmax over all scored candidates;
    a sentence whose graph has no node keeps its NMT hypothesis."""
    if len(examples) != len(graphs):
        raise ValueError(f"examples ({len(examples)}) and graphs ({len(graphs)}) differ in length")
    kw = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    gen_prompts = [(i, a, generate_prompt(ex, a, cfg.demos, cfg.lrl, cfg.names))
                   for i, (ex, g) in enumerate(zip(examples, graphs)) for a in g.gen]
    replies = backend.chat([[{"role": "user", "content": p}] for _, _, p in gen_prompts], **kw) \
        if gen_prompts else []
    gen: list[list] = [[] for _ in examples]
    for (i, a, _), rep in zip(gen_prompts, replies):
        gen[i].append([a, parse_reply(rep)])
    gen_scored = []
    for i, ex in enumerate(examples):
        texts, scores = _score_node([t for _, t in gen[i]], ex, scorer)
        gen_scored.append([(a, t, s) for (a, _), t, s in zip(gen[i], texts, scores)])
    agg_prompts = []
    for i, (ex, g) in enumerate(zip(examples, graphs)):
        by_lang = {a: (t, s) for a, t, s in gen_scored[i]}
        for grp in g.groups:
            best = max(grp, key=lambda a: by_lang[a][1])
            agg_prompts.append((i, grp, aggregate_prompt(ex, grp, by_lang[best][0], cfg.demos,
                                                         cfg.lrl, cfg.names)))
    replies = backend.chat([[{"role": "user", "content": p}] for _, _, p in agg_prompts], **kw) \
        if agg_prompts else []
    agg: list[list] = [[] for _ in examples]
    for (i, grp, _), rep in zip(agg_prompts, replies):
        agg[i].append([grp, parse_reply(rep)])
    results = []
    for i, ex in enumerate(examples):
        texts, scores = _score_node([t for _, t in agg[i]], ex, scorer)
        agg_scored = [(grp, t, s) for (grp, _), t, s in zip(agg[i], texts, scores)]
        cands = [(s, t) for _, t, s in gen_scored[i]] + [(s, t) for _, t, s in agg_scored]
        out = max(cands, key=lambda c: c[0])[1] if cands else ex.nmt
        results.append(SentenceResult(out, tuple(gen_scored[i]), tuple(agg_scored)))
    return results


@dataclasses.dataclass
class POMPState:
    """Learned meta-graph state: languages in similarity order, their probabilities, the step size,
    the number of sentences seen, the last sampled graph and the probability history."""

    langs: tuple[str, ...]
    p: np.ndarray
    eta: float = 1.0
    step: int = 0
    last_graph: Graph | None = None
    history: list = dataclasses.field(default_factory=list)
    skipped: int = 0

    @classmethod
    def from_similarity(cls, similarity: Mapping[str, float], eta: float = 1.0) -> POMPState:
        """Sort languages by similarity (highest first) and set ``p = exp(cos - 1)``."""
        langs = tuple(sorted(similarity, key=lambda a: -similarity[a]))
        p = np.asarray(init_probs([similarity[a] for a in langs]))
        return cls(langs, p, float(eta), 0, None, [p.copy()])

    def probs(self) -> dict[str, float]:
        return {a: float(v) for a, v in zip(self.langs, self.p)}


_sample = jax.jit(sample_graph, static_argnames="max_group")
_credit = jax.jit(credit)
_update = jax.jit(update, static_argnames=("guard", "decay"))


def pomp_train(backend: ChatBackend, examples: Sequence[MTExample], state: POMPState,
               cfg: POMPConfig, scorer: Scorer, *, seed: int = 0, batch_size: int = 1) -> POMPState:
    """Learn the aux-language probabilities on ``examples`` (``refine.py``'s ``train``); returns the
    updated state.

    Per sentence: sample a graph from the current ``p``, run it, credit each Aggregate group's
    members, update ``p`` and decay ``eta``. ``batch_size > 1`` samples that many graphs from the
    same ``p`` and runs them in one batch (like the code's worker threads, which also read a
    stale ``p``); the updates are still applied one sentence at a time, in order.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    key = jax.random.PRNGKey(seed)
    idx = {a: k for k, a in enumerate(state.langs)}
    table = window_table(len(state.langs), cfg.max_group)
    for s in range(0, len(examples), batch_size):
        chunk = list(examples[s:s + batch_size])
        masks = []
        for _ in chunk:
            key, sub = jax.random.split(key)
            masks.append(_sample(sub, jnp.asarray(state.p), max_group=cfg.max_group))
        graphs = [Graph.from_masks(state.langs, m) for m in masks]
        results = run_graphs(backend, chunk, graphs, cfg, scorer)
        for m, g, res in zip(masks, graphs, results):
            gen_scores = np.zeros(len(state.langs), np.float32)
            for a, _, sc in res.gen:
                gen_scores[idx[a]] = sc
            agg_scores = np.zeros(len(table), np.float32)
            on = np.asarray(m.on)
            for w, (_, _, sc) in zip(np.flatnonzero(on), res.agg):
                agg_scores[w] = sc
            r = _credit(m.groups, gen_scores, agg_scores)
            p, eta, skipped = _update(state.p, state.eta, r, m.groups, m.on, guard=cfg.guard,
                                      decay=cfg.decay)
            state.p, state.eta = np.asarray(p), float(eta)
            state.skipped += int(skipped)
            state.step += 1
            state.last_graph = g
            state.history.append(state.p.copy())
    return state


def pomp_infer(backend: ChatBackend, examples: Sequence[MTExample], graph: Graph, cfg: POMPConfig,
               scorer: Scorer) -> list[SentenceResult]:
    """Translate ``examples`` with one fixed graph (as the official test scripts do: the last graph
    sampled in training, or one sampled once from the learned ``p``); no probability update."""
    return run_graphs(backend, examples, [graph] * len(examples), cfg, scorer)


def sample_fixed_graph(state: POMPState, max_group: int | None = 3, seed: int = 0) -> Graph:
    """One graph sampled from the learned probabilities (the official code's path when no
    training graph was saved)."""
    return Graph.from_masks(state.langs, _sample(jax.random.PRNGKey(seed), jnp.asarray(state.p),
                                                  max_group=max_group))
