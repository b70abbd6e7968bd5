"""The step protocol and the one driver: a user's own loop equals ``run``; hooks replace the state
between steps and a halted run resumes to the same state (hooks run once per step position); the
LM step with FSDP-sharded params and Adam moments on 8 fake devices equals the 1-device step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.models import ModelConfig, Transformer
from lmx.parallel import make_mesh, shard_batch, single_device_mesh
from lmx.train import (RunConfig, TrainConfig, TrainState, causal_lm_loss, compile_step, init_state,
                       make_optimizer, make_schedule, make_train_step, run, split_micro, train)

TINY = dict(vocab_size=64, d_model=32, d_ff=64)


def _tokens(step, rows=8):
    return {"tokens": np.random.RandomState(step).randint(0, 64, (rows, 12)).astype(np.int32)}


def _quadratic_step():
    # gradient descent on 0.5 ||p - mean(x)||^2, scaled by a frozen aux factor
    def fn(state, batch, key):
        g = state.params - jnp.mean(batch["x"], axis=0)
        noise = 1e-3 * jax.random.normal(key, g.shape)
        new = state.params - 0.1 * state.aux["scale"] * g + noise
        return state.replace(params=new, extra=state.extra + 1.0), {"loss": jnp.sum(g * g)}
    return compile_step(fn)


def _quadratic_state():
    return TrainState(step=jnp.zeros((), jnp.int32), params=jnp.ones(4), opt_state=(),
                      extra=jnp.zeros(()), aux={"scale": jnp.ones(())})


def _x(step):
    return {"x": np.random.RandomState(step).normal(size=(2, 4)).astype(np.float32)}


def test_users_own_loop_equals_the_driver():
    cfg = TrainConfig(steps=3, lr=1e-2, accum_steps=2, progress=False, seed=4)
    mesh = single_device_mesh()
    ref = train(Transformer(ModelConfig.tiny_llama(**TINY), rngs=nnx.Rngs(0)), causal_lm_loss, _tokens, cfg,
                mesh=mesh)
    tx = make_optimizer(cfg)
    graphdef, state, shardings = init_state(Transformer(ModelConfig.tiny_llama(**TINY), rngs=nnx.Rngs(0)), tx,
                                            mesh=mesh)
    step = make_train_step(graphdef, causal_lm_loss, tx, shardings=shardings, schedule=make_schedule(cfg))
    key = jax.random.PRNGKey(cfg.seed)
    losses = []
    for s in range(cfg.steps):
        batch = shard_batch(split_micro(_tokens(s), cfg.accum_steps), mesh, batch_axis=1)
        state, metrics = step(state, batch, jax.random.fold_in(key, s))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and ref.step == 3
    np.testing.assert_allclose(losses, ref.losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(nnx.state(ref.model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [r["lr"] for r in ref.history] == pytest.approx([float(make_schedule(cfg)(s)) for s in range(3)])


def test_hooks_replace_the_state_and_a_halted_run_resumes_to_the_same_state(tmp_path):
    mesh = single_device_mesh()
    calls = []

    def freeze_at_3(s, state):
        calls.append(s)
        if s == 3:  # an event: from step 3 on the update is scaled down (lives in aux, checkpointed)
            return state.replace(aux={"scale": jnp.full((), 0.25)})
        return None

    step = _quadratic_step()
    straight = run(_quadratic_state(), step, _x, RunConfig(steps=6, progress=False), mesh=mesh,
                   hooks=[freeze_at_3])
    assert calls == list(range(6)) and int(straight.state.step) == 6
    assert float(straight.state.aux["scale"]) == 0.25 and float(straight.state.extra) == 6.0
    no_hook = run(_quadratic_state(), step, _x, RunConfig(steps=6, progress=False), mesh=mesh)
    assert not np.allclose(no_hook.state.params, straight.state.params)

    calls.clear()
    cfg = RunConfig(steps=6, progress=False, ckpt_dir=str(tmp_path / "ck"), ckpt_every=2)
    first = run(_quadratic_state(), step, _x, dataclasses.replace(cfg, halt_after=4), mesh=mesh,
                hooks=[freeze_at_3])
    assert first.step == 4 and calls == [0, 1, 2, 3]
    resumed = run(_quadratic_state(), step, _x, cfg, mesh=mesh, hooks=[freeze_at_3])
    assert calls == [0, 1, 2, 3, 4, 5] and resumed.step == 6
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)
    np.testing.assert_allclose(resumed.state.params, straight.state.params, rtol=1e-6)
    assert float(resumed.state.aux["scale"]) == 0.25 and float(resumed.state.extra) == 6.0


def test_driver_validates_its_inputs():
    mesh = make_mesh(data=8)
    with pytest.raises(TypeError, match="TrainState"):
        run({"params": 1}, _quadratic_step(), _x, RunConfig(steps=1), mesh=mesh)
    with pytest.raises(TypeError, match="RunConfig"):
        run(_quadratic_state(), _quadratic_step(), _x, TrainConfig(steps=1), mesh=mesh)
    with pytest.raises(ValueError, match="steps"):
        RunConfig(steps=-1)
    with pytest.raises(ValueError, match="log_every"):
        RunConfig(steps=1, log_every=0)
    # 2 rows cannot be split over the 8-way data axis: an error, not silent replication
    with pytest.raises(ValueError, match=r"cannot be split 8 ways"):
        run(_quadratic_state(), _quadratic_step(), _x, RunConfig(steps=1, progress=False), mesh=mesh)


def test_fsdp_lm_step_on_8_devices_equals_one_device():
    """Params and Adam moments FSDP-sharded (data 2 x fsdp 4, and data 2 x fsdp 2 x tensor 2), activations
    pinned by logical axes: same loss and updated params as one device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    cfg = TrainConfig(steps=2, lr=1e-2, accum_steps=2)
    tx = make_optimizer(cfg)
    batch = split_micro(_tokens(0, rows=16), 2)
    out, pins = {}, {}
    with jax.default_matmul_precision("highest"):
        for name, mesh in (("one", single_device_mesh()), ("fsdp", make_mesh(data=2, fsdp=4)),
                           ("tensor", make_mesh(data=2, fsdp=2, tensor=2))):
            graphdef, state, shardings = init_state(Transformer(ModelConfig.tiny_llama(**TINY), rngs=nnx.Rngs(0)),
                                                    tx, mesh=mesh)
            step = make_train_step(graphdef, causal_lm_loss, tx, shardings=shardings)
            placed = shard_batch(batch, mesh, batch_axis=1)
            program = jax.jit(step.fn).lower(state, placed, jax.random.PRNGKey(0)).as_text()
            pins[name] = [line for line in program.splitlines() if "sharding_constraint" in line]
            for s in range(2):
                state, metrics = step(state, shard_batch(batch, mesh, batch_axis=1), jax.random.PRNGKey(s))
            out[name] = (state, float(metrics["loss"]))
    # activations pinned batch-sharded inside the traced step (residual stream [micro, T, D] over
    # data x fsdp; q heads over tensor), none on one device
    assert not pins["one"]
    assert any('[{"data", "fsdp"}, {}, {}]> : tensor<8x12x32xf32>' in line for line in pins["fsdp"])
    assert any('{"tensor"}, {}]> : tensor<8x12x4x8xf32>' in line for line in pins["tensor"])
    (one, l1), (fsdp, l8), (tp, lt) = out["one"], out["fsdp"], out["tensor"]
    assert abs(l1 - l8) <= 1e-5 and abs(l1 - lt) <= 1e-5
    wqkv = fsdp.params["wqkv"][...]
    assert wqkv.sharding.spec[1] == "fsdp" and len(wqkv.sharding.device_set) == 8
    mu = fsdp.opt_state[1][0].mu["wqkv"][...]  # clip, then adamw's ScaleByAdamState
    assert mu.sharding.spec == wqkv.sharding.spec
    for a, b, c in zip(jax.tree.leaves(one.params), jax.tree.leaves(fsdp.params), jax.tree.leaves(tp.params)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=5e-3 * cfg.lr)
        # Adam divides each coordinate by its gradient's RMS: near-zero gradients whose last bits
        # differ (another reduction order) move by a small fraction of lr
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-3 * cfg.lr)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(one.params), jax.tree.leaves(init_state(
                    Transformer(ModelConfig.tiny_llama(**TINY), rngs=nnx.Rngs(0)), tx)[1].params)))
    assert moved > 1e-3
