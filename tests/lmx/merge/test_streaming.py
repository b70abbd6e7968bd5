import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import lmx.merge as LM
from lmx.merge import methods as M
from lmx.merge import runner, streaming as S


def _ckpt(seed):
    r = np.random.default_rng(seed)
    return {"model.embed.weight": r.normal(size=(33, 8)).astype(np.float32),
            "model.layers.0.w": r.normal(size=(8, 8)).astype(ml_dtypes.bfloat16),
            "model.layers.0.b": r.normal(size=(8,)).astype(np.float16),
            "model.pos_ids": np.arange(5, dtype=np.int64)}


@pytest.fixture
def ckpts(tmp_path):
    base, fts = _ckpt(0), [_ckpt(i) for i in (1, 2, 3)]
    (tmp_path / "base").mkdir()
    S.save_safetensors(base, tmp_path / "base" / "model.safetensors", {"format": "pt"})
    (tmp_path / "base" / "config.json").write_text('{"arch": "toy"}')
    paths = []
    for i, f in enumerate(fts):
        p = tmp_path / f"ft{i}.safetensors"
        S.save_safetensors(f, p)
        paths.append(p)
    return tmp_path, base, fts, paths


@pytest.mark.parametrize("method", [
    M.TaskArithmetic(0.3), M.TaskArithmetic([0.2, 0.5, 1.0]), M.Average(), M.Ties(),
    M.Ties(k=0.5, merge="mean", lam=1.0, scope="per_leaf", topk="exact"), M.Dare(p=0.3),
    M.Dare(p=0.5, ties=M.Ties(lam=0.5))], ids=lambda m: repr(m)[:40])
def test_streamed_chunked_merge_equals_in_memory_bit_for_bit(ckpts, method):
    tmp, base, fts, paths = ckpts
    # 20-element chunks: the 33x8 embedding is merged 2 rows at a time, the rest whole
    summary = S.stream_merge(method, tmp / "base", paths, tmp / "out", progress=False,
                             chunk_elems=20)
    streamed = S.load_safetensors(tmp / "out")
    if isinstance(method, M.Average):
        mem = M.merge_tree(method, base, finetuned=fts)
    else:
        mem = M.merge_tree(method, base, LM.task_vectors(base, fts))
    assert list(streamed) == list(base)
    for n, x in mem.items():
        a = np.asarray(x)
        assert streamed[n].dtype == a.dtype and streamed[n].shape == a.shape
        assert streamed[n].tobytes() == a.tobytes(), n
    np.testing.assert_array_equal(streamed["model.pos_ids"], base["model.pos_ids"])
    assert summary["n_tensors"] == 4 and summary["bytes_out"] > 0
    assert (tmp / "out" / "config.json").read_text() == '{"arch": "toy"}'


def test_output_dtype_cast_and_sharded_output(ckpts):
    tmp, base, fts, paths = ckpts
    S.stream_merge(M.TaskArithmetic(0.3), tmp / "base", paths, tmp / "sh", dtype="bfloat16",
                   max_shard_bytes=600, progress=False)
    index = json.loads((tmp / "sh" / S.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 2
    out = S.load_safetensors(tmp / "sh")
    assert out["model.embed.weight"].dtype == ml_dtypes.bfloat16
    assert out["model.pos_ids"].dtype == np.int64
    mem = M.task_arithmetic(base, LM.task_vectors(base, fts), 0.3, dtype=jnp.bfloat16)
    assert out["model.embed.weight"].tobytes() == np.asarray(mem["model.embed.weight"]).tobytes()


def test_missing_tensor_in_one_checkpoint_names_it(ckpts):
    tmp, base, fts, paths = ckpts
    broken = dict(fts[1])
    del broken["model.layers.0.b"]
    S.save_safetensors(broken, paths[1])
    with pytest.raises(ValueError, match=r"ft1.safetensors: missing tensor 'model.layers.0.b'"):
        S.stream_merge(M.TaskArithmetic(), tmp / "base", paths, tmp / "out", progress=False)


def test_shape_and_dtype_mismatch_in_checkpoint_named(ckpts):
    tmp, base, fts, paths = ckpts
    bad = dict(fts[0], **{"model.layers.0.b": np.zeros(9, np.float16)})
    S.save_safetensors(bad, paths[0])
    with pytest.raises(ValueError, match=r"'model.layers.0.b'.*\(9,\)"):
        S.stream_merge(M.TaskArithmetic(), tmp / "base", paths, tmp / "out", progress=False)
    bad = dict(fts[0], **{"model.layers.0.b": np.zeros(8, np.float32)})
    S.save_safetensors(bad, paths[0])
    with pytest.raises(TypeError, match=r"'model.layers.0.b'.*float32"):
        S.stream_merge(M.TaskArithmetic(), tmp / "base", paths, tmp / "out", progress=False)


def test_writer_is_readable_by_safetensors_and_checks_order(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.float32, (2, 3)), ("b", np.int32, (1,))],
                            {"k": "v"})
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", np.zeros(1, np.int32))
    w.write("a", a)
    w.write("b", np.array([7], np.int32))
    w.close()
    with safe_open(str(tmp_path / "x.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), a)
        assert f.metadata() == {"k": "v"} and int(f.get_tensor("b")[0]) == 7


def test_runner_config_produces_checkpoint_and_summary(ckpts, capsys):
    tmp, base, fts, paths = ckpts
    cfg = {"base": str(tmp / "base"), "models": [str(p) for p in paths],
           "method": {"name": "ties", "k": 0.2, "lam": 0.3, "merge": "sum"},
           "output": {"path": str(tmp / "merged")}}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    assert runner.main([str(tmp / "cfg.json"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| Ties |" in table and "GB/s" in table
    summary = json.loads((tmp / "merged" / "merge_summary.json").read_text())
    assert summary["passes"] == 4 and summary["stats"]["kept_fraction"] > 0.2
    mem = M.ties_merging(base, LM.task_vectors(base, fts))
    out = S.load_safetensors(tmp / "merged")
    assert out["model.embed.weight"].tobytes() == np.asarray(mem["model.embed.weight"]).tobytes()


def test_runner_orbax_output(ckpts):
    ocp = pytest.importorskip("orbax.checkpoint")
    tmp, base, fts, paths = ckpts
    cfg = {"base": str(tmp / "base"), "models": [str(p) for p in paths],
           "method": {"name": "task_arithmetic", "lam": 0.3},
           "output": {"path": str(tmp / "orb"), "format": "orbax"}}
    runner.run_merge(cfg, progress=False)
    restored = ocp.StandardCheckpointer().restore(tmp / "orb")
    mem = M.task_arithmetic(base, LM.task_vectors(base, fts), 0.3)
    np.testing.assert_array_equal(restored["model.embed.weight"], mem["model.embed.weight"])


def test_runner_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown method 'slerp'"):
        runner.build_method({"name": "slerp"})
    with pytest.raises(ValueError, match=r"unknown fields \['density'\]"):
        runner.build_method({"name": "ties", "density": 0.2})
    with pytest.raises(ValueError, match="missing key 'models'"):
        runner.validate_config({"base": "b", "method": {"name": "average"}, "output": "o"})
    assert isinstance(runner.build_method({"name": "dare", "ties": {"lam": 0.5}}).ties, M.Ties)


def test_shipped_configs_validate():
    import pathlib

    cfgs = sorted((pathlib.Path(__file__).resolve().parents[3] / "configs" / "merge").glob("*.json"))
    assert len(cfgs) >= 3
    for p in cfgs:
        cfg = runner.validate_config(json.loads(p.read_text()))
        assert runner.build_method(cfg["method"]) is not None


def test_zero_d_tensor_round_trips_and_stream_merges(tmp_path):
    # CLIP checkpoints hold a 0-d logit_scale; np.ascontiguousarray used to turn it into (1,).
    S.save_safetensors({"logit_scale": np.asarray(4.6, np.float32)}, tmp_path / "s.safetensors")
    back = S.load_safetensors(tmp_path / "s.safetensors")
    assert back["logit_scale"].shape == () and back["logit_scale"] == np.float32(4.6)
    r = np.random.default_rng(0)
    make = lambda s: {"logit_scale": np.asarray(s, np.float32),
                      "w": r.normal(size=(3, 2)).astype(np.float32)}
    base, fts = make(4.6), [make(4.0), make(5.0)]
    S.save_safetensors(base, tmp_path / "base.safetensors")
    paths = []
    for i, f in enumerate(fts):
        paths.append(tmp_path / f"ft{i}.safetensors")
        S.save_safetensors(f, paths[-1])
    for method in (M.TaskArithmetic(0.5), M.Ties(k=0.5, lam=1.0), M.Dare(p=0.3), M.Average()):
        S.stream_merge(method, tmp_path / "base.safetensors", paths, tmp_path / "out",
                       progress=False, chunk_elems=2)
        out = S.load_safetensors(tmp_path / "out")
        mem = (M.merge_tree(method, base, finetuned=fts) if isinstance(method, M.Average)
               else M.merge_tree(method, base, LM.task_vectors(base, fts)))
        assert out["logit_scale"].shape == ()
        assert out["logit_scale"].tobytes() == np.asarray(mem["logit_scale"]).tobytes()
    # task arithmetic on the scalar: 4.6 + 0.5 * ((4.0 - 4.6) + (5.0 - 4.6))
    S.stream_merge(M.TaskArithmetic(0.5), tmp_path / "base.safetensors", paths, tmp_path / "ta",
                   progress=False)
    np.testing.assert_allclose(S.load_safetensors(tmp_path / "ta")["logit_scale"], 4.5, rtol=1e-6)
    # and through the runner (safetensors output)
    runner.run_merge({"base": str(tmp_path / "base.safetensors"),
                      "models": [str(p) for p in paths],
                      "method": {"name": "ties", "k": 0.5, "lam": 1.0},
                      "output": {"path": str(tmp_path / "run")}}, progress=False)
    assert S.load_safetensors(tmp_path / "run")["logit_scale"].shape == ()
