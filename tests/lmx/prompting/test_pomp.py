"""POMP: sampling, credit, update on hand-computed cases, prompts byte for byte, learning on the
synthetic cipher languages (POMP, arXiv:2401.05596, as its official code runs it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prompting_helpers import sentences

from lmx.backends.testing import ScriptedBackend
from lmx.prompting import pomp
from lmx.prompting.cipher import make_task, toy_refine
from lmx.prompting.pomp import (
    ConsensusScorer,
    Graph,
    MTExample,
    POMPConfig,
    POMPState,
    ReferenceScorer,
    aggregate_prompt,
    credit,
    generate_prompt,
    init_probs,
    sample_graph,
    squash,
    update,
    window_table,
)


def test_init_probs_and_windows():
    np.testing.assert_allclose(init_probs([1.0, 0.5, 0.0]), np.exp([0.0, -0.5, -1.0]), rtol=1e-6)
    assert window_table(4).tolist() == [[0, 2], [0, 3], [1, 3], [1, 4], [2, 4]]
    assert window_table(3, None).tolist() == [[0, 2], [0, 3], [1, 3]]
    with pytest.raises(ValueError, match="max_group"):
        window_table(3, 1)
    with pytest.raises(ValueError, match="cos_sim"):
        init_probs(np.zeros((2, 2)))


def test_sample_all_ones_gives_every_window():
    m = pomp._sample(jax.random.PRNGKey(0), jnp.ones(5), max_group=3)
    assert bool(m.gen.all()) and bool(m.on.all())
    g = Graph.from_masks(list("abcde"), m)
    assert g.groups == (("a", "b"), ("a", "b", "c"), ("b", "c"), ("b", "c", "d"), ("c", "d"),
                        ("c", "d", "e"), ("d", "e"))
    again = pomp._sample(jax.random.PRNGKey(0), jnp.full(5, 0.6), max_group=3)
    assert np.array_equal(again.gen, pomp._sample(jax.random.PRNGKey(0), jnp.full(5, 0.6), max_group=3).gen)


def test_windows_are_contiguous_in_kept_list_brute_force():
    p = jnp.asarray([0.9, 0.3, 0.7, 0.5, 0.8, 0.4])
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    masks = jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: sample_graph(k, p)))(keys))
    for b in range(200):
        kept = [a for a in range(6) if masks.gen[b, a]]
        brute = {tuple(kept[i:j]) for i in range(len(kept)) for j in range(i + 2, min(i + 3, len(kept)) + 1)}
        rows = {tuple(np.flatnonzero(r)) for r in masks.groups[b] if r.any()}
        assert rows == brute
        for r, on in zip(masks.groups[b], masks.on[b]):
            if on:
                assert tuple(np.flatnonzero(r)) in brute


def test_sampling_rates_bernoulli_and_geomean():
    keys = jax.random.split(jax.random.PRNGKey(2), 4000)
    masks = jax.jit(jax.vmap(lambda k: sample_graph(k, jnp.asarray([1.0, 0.25]))))(keys)
    assert abs(float(masks.gen[:, 1].mean()) - 0.25) < 0.025
    # window valid iff both kept (0.25), then kept with prob sqrt(1 * 0.25) = 0.5
    assert abs(float(masks.on[:, 0].mean()) - 0.125) < 0.02


def test_credit_hand_cases():
    r = credit([[True, True, False]], [0.5, 0.7, 0.0], [0.8])
    np.testing.assert_allclose(r, [[0.1, 0.3, 0.0]], atol=1e-6)
    r3 = credit([[True, True, True]], [0.3, 0.6, 0.9], [0.9])
    np.testing.assert_allclose(r3, [[0.15, 0.3, 0.45]], atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        credit([[True, False]], [0.1, 0.2, 0.3], [0.5])


def test_update_hand_cases():
    g = jnp.asarray([[True, False]])
    on = jnp.asarray([True])
    # r = 0.1, eta = 1: f(0.1) = 0.1 * sigmoid(-0.1) = 0.0475021 -> p * 1.0237510
    p, eta, skipped = update(jnp.asarray([0.5, 0.5]), 1.0, jnp.asarray([[0.1, 0.0]]), g, on)
    np.testing.assert_allclose(p, [0.5 * 1.0237510, 0.5], rtol=1e-6)
    assert float(eta) == pytest.approx(0.9) and int(skipped) == 0
    # r = 0.5: f = 0.1888 >= 0.1 -> skipped; r = -0.1 shrinks
    p, _, skipped = update(jnp.asarray([0.5, 0.5]), 1.0, jnp.asarray([[0.5, 0.0]]), g, on)
    np.testing.assert_allclose(p, [0.5, 0.5])
    assert int(skipped) == 1
    p, _, _ = update(jnp.asarray([0.5, 0.5]), 1.0, jnp.asarray([[-0.1, 0.0]]), g, on)
    np.testing.assert_allclose(p, [0.5 * (1 - 0.0237510), 0.5], rtol=1e-6)
    # guard band with eta = 1 is about 0.225 < |r| < 3.54
    assert float(squash(0.2)) < 0.1 <= float(squash(0.25)) and float(squash(3.6)) < 0.1 <= float(squash(3.5))
    # clip at 1, two groups applied in sequence, off groups untouched
    groups = jnp.asarray([[True, True], [True, False], [False, True]])
    r = jnp.full((3, 2), 0.1)
    p, _, _ = update(jnp.asarray([0.99, 0.5]), 1.0, r, groups, jnp.asarray([True, True, False]))
    np.testing.assert_allclose(p, [1.0, 0.5 * 1.0237510], rtol=1e-6)
    # eta decays 0.9 per sentence and a smaller eta shrinks the step
    eta = 1.0
    for _ in range(3):
        _, eta, _ = update(jnp.asarray([0.5, 0.5]), eta, jnp.zeros((1, 2)), g, on)
    assert float(eta) == pytest.approx(0.9 ** 3)


def test_prompts_byte_for_byte():
    names = {"xx": "Xeno", "de": "German", "es": "Spanish"}
    demo = MTExample("s1", "e1", {"de": "d1", "es": "p1"}, "r1")
    ex = MTExample("s2", "e2", {"de": "d2", "es": "p2"})
    assert generate_prompt(ex, "de", [demo], "xx", names) == (
        "<Xeno source>: s1\n<German translation>: d1\n<English translation>: e1\n"
        "<Refined translation>: r1\n\n"
        "<Xeno source>: s2\n<German translation>: d2\n<English translation>: e2\n<Refined translation>:")
    assert aggregate_prompt(ex, ["es", "de"], "BEST", [demo], "xx", names) == (
        "<Xeno source>: s1\n<Spanish translation>: p1\n<German translation>: d1\n"
        "<English translation>: e1\n<Refined translation>: r1\n\n"
        "<Xeno source>: s2\n<Spanish translation>: p2\n<German translation>: d2\n"
        "<English translation>: BEST\n<Refined translation>:")
    assert pomp.parse_reply("\n  first line \nsecond") == "first line"


def test_scorers_and_graph_json():
    ex = MTExample("s", "the cat sat", {}, "the cat sat down")
    c = ConsensusScorer()(["the cat sat down", "the cat sat", "a dog ran"], ex)
    assert c[0] > c[2] and c[1] > c[2]
    assert ConsensusScorer()(["the cat sat"], ex) == [pytest.approx(1.0)]
    r = ReferenceScorer()(["the cat sat down", "a dog"], ex)
    assert r[0] == pytest.approx(1.0) and r[1] < 0.3
    g = Graph(("a", "b", "c"), (("a", "b"),))
    assert Graph.from_json(g.to_json()) == g
    with pytest.raises(ValueError, match="without a Generate node"):
        Graph(("a",), (("a", "b"),))


def test_toy_refiner_votes():
    lex = frozenset(["the", "cat", "sat", "down", "dog"])
    prompt = ("<X source>: q w e r\n<A translation>: the dog sat zz\n<B translation>: the cat sat kk\n"
              "<C translation>: the cat zz kk\n<English translation>: the cat ran down\n<Refined translation>:")
    assert toy_refine(prompt, lex) == "the cat sat down"


def test_learning_raises_useful_language_on_cipher_task():
    task = make_task(sentences(60), seed=0)
    backend = ScriptedBackend(lambda c: toy_refine(c[-1]["content"], task.lexicon))
    cfg = POMPConfig(lrl=task.lrl, names=task.names, demos=task.examples[:2])
    state = POMPState.from_similarity(task.similarity)
    p0 = state.probs()
    assert state.langs == ("a1", "a2", "a3", "a4", "a5", "a6")  # similarity order
    state = pomp.pomp_train(backend, task.examples[2:52], state, cfg, ReferenceScorer(), batch_size=10)
    p = state.probs()
    assert state.step == 50 and len(state.history) == 51 and state.eta == pytest.approx(0.9 ** 50, rel=1e-5)
    # a2 (3% noise) gains; a1 and a3 (50% noise) end below it although a1 started highest
    assert p["a2"] > p0["a2"] and p["a2"] > p["a1"] and p["a2"] > p["a3"]
    assert all(0.0 < v <= 1.0 for v in p.values())
