import numpy as np
import pytest

from benchmarks.common import timeit, timeit_interleaved


def test_interleaved_rounds_alternate_and_count():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = timeit_interleaved(fns, repeats=3, warmup=1)
    # warm-up of each, then one call of each per timed round
    assert calls == ["a", "b"] + ["a", "b"] * 3
    for name in fns:
        assert out[name]["repeats"] == 3 and len(out[name]["all_s"]) == 3
        assert out[name]["min_s"] <= out[name]["median_s"]


def test_timeit_single_and_bad_arguments():
    n = []
    t = timeit(lambda: n.append(1), repeats=4, warmup=2)
    assert len(n) == 6 and t["repeats"] == 4
    with pytest.raises(ValueError, match="repeats"):
        timeit_interleaved({"a": lambda: None}, repeats=0)


def test_plots_are_moved_and_tagged_per_preset(tmp_path):
    from benchmarks.common import tag_with_preset

    work = tmp_path / ".work-graphs-cpu_long"
    work.mkdir()
    p = work / "graphs_tradeoff.png"
    p.write_bytes(b"png")
    new = tag_with_preset(str(p), "graphs", "cpu_long", tmp_path)
    assert new == "graphs_cpu_long_tradeoff.png" and not p.exists()
    assert (tmp_path / new).read_bytes() == b"png"
    assert tag_with_preset(str(tmp_path / new), "graphs", "cpu_long", tmp_path) == new


def test_result_files_record_repo_relative_paths_and_the_allocator(tmp_path, monkeypatch):
    import json

    from benchmarks.common import REPO_ROOT, write_result

    monkeypatch.setenv("LD_PRELOAD", "/some/lib/libjemalloc.so.2")
    result = {"summary": [{"a": 1}], "data": REPO_ROOT / "configs" / "bench" / "gp.json"}
    path = write_result("demo", "quick", {}, result, 1.0, tmp_path)
    record = json.loads(path.read_text())
    assert record["data"] == "configs/bench/gp.json"
    assert record["machine"]["allocator"] == "jemalloc"
    assert str(REPO_ROOT) not in path.read_text()
    monkeypatch.delenv("LD_PRELOAD")
    record = json.loads(write_result("demo", "quick", {}, result, 1.0, tmp_path).read_text())
    assert record["machine"]["allocator"] == "system malloc"


def test_graphs_combined_settings_all_four_or_listed_axes():
    from benchmarks.suites.graphs import _settings

    cfg = {"axes": ["token"], "sparsities": [0.75],
           "combined": [0.25, {"axes": ["token", "head"], "s": 0.5}]}
    out = {(mode, axis, s): g for mode, axis, s, g in _settings(cfg, first_seed=True)}
    assert set(out) == {("clean", "token", 0.75), ("clean", "all4", 0.25),
                        ("clean", "token+head", 0.5)}
    g = out[("clean", "token+head", 0.5)]
    assert (g.token, g.head, g.layer, g.weight) == (0.5, 0.5, 0.0, 0.0)
    g = out[("clean", "all4", 0.25)]
    assert (g.token, g.head, g.layer, g.weight) == (0.25, 0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="combined setting"):
        _settings({"axes": [], "sparsities": [], "combined": [{"axes": ["tokens"], "s": 0.5}]},
                  first_seed=True)


def test_graphs_mutag_cross_validation_folds_partition_the_dataset():
    from benchmarks.suites.graphs import _dataset

    tests = []
    for fold in range(5):
        ds, tr, te, metric = _dataset("mutag", 3, None, fold, 5)
        assert metric == "accuracy" and not set(tr) & set(te)
        assert len(tr) + len(te) == len(ds) and len(te) in (37, 38)
        tests.append(te)
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(ds)))


def test_graphs_cross_validation_only_for_mutag():
    from benchmarks.suites.graphs import _dataset

    with pytest.raises(ValueError, match="folds"):
        _dataset("solubility", 0, 50, 0, 5)


def test_lm_unknown_train_contender_raises_before_any_training(tmp_path):
    from benchmarks.suites import lm
    with pytest.raises(ValueError, match="train_extra"):
        lm.run({"train_shapes": [[1, 4]], "train_extra": ["ours_fast"], "train_repeats": 1,
                "train_warmup": 0}, tmp_path)


def test_mesh_spec_is_validated_and_recorded_only_when_a_suite_uses_it(tmp_path):
    import json

    from benchmarks import common

    with pytest.raises(ValueError, match="mesh spec"):
        common.set_mesh_spec("data=2,pipeline=4")
    with pytest.raises(ValueError):
        common.set_mesh_spec("data=16")  # more than the 8 test devices
    try:
        common.set_mesh_spec("data=2,fsdp=4")
        rec = json.loads(common.write_result("demo", "quick", {}, {"summary": []}, 1.0,
                                             tmp_path).read_text())["mesh"]
        assert rec == {"spec": "data=2,fsdp=4", "used_by_suite": False, "process_count": 1}
        mesh = common.bench_mesh()
        assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
        rec = json.loads(common.write_result("demo", "quick", {}, {"summary": []}, 1.0,
                                             tmp_path).read_text())["mesh"]
        assert rec["used_by_suite"] and rec["axes"] == {"data": 2, "fsdp": 4, "tensor": 1}
        assert rec["devices"] == 8 and rec["process_count"] == 1
    finally:
        common.set_mesh_spec(None)


def test_cli_rejects_a_bad_mesh_before_running_a_suite(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["list", "--mesh", "data=0"])
    assert e.value.code == 2 and "--mesh" in capsys.readouterr().err
