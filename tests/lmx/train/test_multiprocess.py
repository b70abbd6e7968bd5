"""A real multi-process run: two Python processes on 127.0.0.1, launched with the environment of a
two-task SLURM job step and joined by ``lmx.parallel.initialize_distributed()`` without arguments
(JAX's cluster auto-detection; CPU collectives over gloo), each feeding only its half of every batch, must end with the same
parameters as one process holding the whole batch; a checkpoint written by the two processes
resumes in one (and, resumed at step 2, ends where the uninterrupted run does).

Each process has 2 CPU devices, so both runs use the same 4-device ``data=2, fsdp=2`` mesh and
the parameters are FSDP-sharded across the two processes.
"""
from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
from multiprocess_launch import launch

SCRIPT = textwrap.dedent('''
    import json, os, sys
    pid, nproc, ckpt, out = sys.argv[1:5]
    pid, nproc = int(pid), int(nproc)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from lmx.parallel import initialize_distributed, make_mesh
    # no arguments: the processes join through JAX's cluster auto-detection (a SLURM-style launch)
    assert initialize_distributed() == (nproc > 1)
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from lmx.models import ModelConfig, Transformer
    from lmx.train import TrainConfig, causal_lm_loss, train

    assert jax.process_count() == nproc and jax.device_count() == 4
    mesh = make_mesh(data=2, fsdp=2)
    rows = 8 // nproc

    def config(wing):
        return TrainConfig(steps=4, lr=3e-3, warmup_steps=1, ckpt_dir=f"{ckpt}_{wing}" if ckpt else None,
                           ckpt_every=2, progress=False)

    def local_rows(batch):
        return {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}

    def tiny(seed, **kw):
        return Transformer(ModelConfig.tiny_llama(vocab_size=64, d_model=32, d_ff=64, **kw),
                           rngs=nnx.Rngs(seed))

    def lm():
        def get_batch(step):
            r = np.random.RandomState(step)
            return local_rows({"tokens": r.randint(0, 64, (8, 12)).astype(np.int32)})
        res = train(tiny(0), causal_lm_loss, get_batch, config("lm"), mesh=mesh)
        return res.losses, res.model

    def kd():
        from lmx.kd import ATKDConfig
        from lmx.kd.trainer import DistillConfig, distill
        tokens = np.random.RandomState(7).randint(0, 64, (16, 12)).astype(np.int32)
        dcfg = DistillConfig(loss=ATKDConfig(), train=config("kd"), batch_size=8)
        res = distill(tiny(1, n_layers=1), tiny(2), tokens, dcfg, mesh=mesh)
        return res.losses, res.student

    record = {}
    for wing, run in (("lm", lm), ("kd", kd)):
        losses, trained = run()
        params = nnx.state(trained, nnx.Param)
        gathered = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                params)
        record[wing] = {"losses": losses,
                        "params": {jax.tree_util.keystr(k): v.tolist()
                                   for k, v in jax.tree_util.tree_leaves_with_path(gathered)},
                        "shardings": sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)})}
    if pid == 0:
        with open(out, "w") as f:
            json.dump(record, f)
    if nproc > 1:
        jax.distributed.shutdown()
''')


def _run(tmp_path, nproc, *, ckpt="", tag):
    out = tmp_path / f"{tag}.json"
    launch(SCRIPT, nproc, [ckpt, str(out)], cwd=tmp_path)
    return json.loads(out.read_text())


def _assert_same_params(a, b):
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        np.testing.assert_allclose(np.asarray(a["params"][k]), np.asarray(b["params"][k]),
                                   atol=2e-6, rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_their_checkpoint_resumes_in_one(tmp_path):
    """Two processes with half the batch each, checkpointing after steps 2 and 4; one process
    with the whole batch; one process resuming from the two processes' step-2 checkpoint. One
    test, not one per wing: a shared module fixture ran once per pytest-xdist worker in CI."""
    ckpt = str(tmp_path / "ckpt")
    two_run = _run(tmp_path, 2, ckpt=ckpt, tag="two")
    for wing in ("lm", "kd"):  # leave step 2 as the latest checkpoint to resume from
        shutil.rmtree(tmp_path / f"ckpt_{wing}" / "4")
    one_run, resumed_run = _run(tmp_path, 1, tag="one"), _run(tmp_path, 1, ckpt=ckpt, tag="resumed")
    for wing in ("lm", "kd"):
        one, two, resumed = one_run[wing], two_run[wing], resumed_run[wing]
        assert len(one["losses"]) == len(two["losses"]) == 4
        np.testing.assert_allclose(two["losses"], one["losses"], atol=1e-6, rtol=1e-6)
        _assert_same_params(two, one)
        # the parameters really were split over the two processes' devices, not replicated
        assert any("fsdp" in s for s in two["shardings"]), two["shardings"]
        assert one["losses"][-1] < one["losses"][0]
        np.testing.assert_allclose(resumed["losses"], one["losses"], atol=1e-6, rtol=1e-6)
        _assert_same_params(resumed, one)
