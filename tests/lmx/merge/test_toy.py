"""Spec 5.5 orderings on the offline digits multi-task setup (one seed, short schedules)."""
import warnings

import pytest

import lmx.merge as LM

toy = pytest.importorskip("lmx.merge.toy")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def tasks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt = toy.ToyTasks(toy.ToyConfig(pretrain_steps=400, finetune_steps=200, multitask=False), seed=0)
    return tt, LM.task_vectors(tt.base, tt.finetuned)


@pytest.mark.slow
def test_toy_orderings_and_supervised_adamerging(tasks):
    tt, tvs = tasks
    avg = lambda p: float(tt.accuracy(p).mean())
    individual = float(tt.individual_accuracy().mean())
    ta3 = avg(LM.task_arithmetic(tt.base, tvs, 0.3))
    merges = {"average": avg(LM.average(tt.finetuned)), "ta0.3": ta3,
              "ties": avg(LM.ties_merging(tt.base, tvs)), "dare": avg(LM.dare(tt.base, tvs))}
    assert all(individual > v for v in merges.values()), (individual, merges)
    # TIES is far more robust to a large lambda than task arithmetic
    assert avg(LM.ties_merging(tt.base, tvs, merge="mean", lam=1.0)) > avg(
        LM.task_arithmetic(tt.base, tvs, 1.0)) + 0.05
    assert avg(LM.regmean(tt.finetuned, tt.regmean_grams())) > merges["average"]

    # supervised surrogate: the objective falls and accuracy does not drop below the TA start
    sup = tt.batches(labels=True)
    r = LM.adamerging(tt.base, tvs, tt.cross_entropy_objective, sup,
                      LM.AdaMergingConfig(steps=40, lr=1e-2, progress=False))
    h = r.history["adamerging"]
    assert h[-10:].mean() < h[:10].mean()
    assert avg(r.params) >= ta3 - 0.005
