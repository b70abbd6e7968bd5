"""The GP hyperparameter fit on the training-step protocol: ``gp.api.make_fit_step`` driven by a
user's own loop, by ``gp.api.fit`` (one ``lax.scan``) and by ``lmx.train.run`` with checkpoints
and a resume, all reaching the same hyperparameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gp import api

STEPS = 24


def _data(rng):
    x = rng.uniform(0, 40, 150)                     # unsorted: the step sorts once
    return x, np.sin(x / 2.0) + 0.1 * rng.normal(size=150)


def test_own_loop_equals_fit_and_loss_curve(rng):
    x, y = _data(rng)
    init, step = api.make_fit_step(x, y, 1, learning_rate=0.1)
    params, opt_state = init(0.5, 0.3, 0.5)
    state = api.FitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, None, None)
        losses.append(float(metrics["loss"]))
    res = api.fit(x, y, 1, lengthscale=0.5, variance=0.3, noise=0.5, steps=STEPS,
                  learning_rate=0.1)
    got = np.exp(np.asarray(state.params))
    want = np.array([res.lengthscale, res.variance, res.noise])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(losses, res.losses, rtol=1e-12)
    assert losses[-1] < losses[0]
    assert int(state.step) == 0          # the step leaves the counter to its driver


def test_lmx_train_run_with_checkpoint_resume_equals_fit(rng, tmp_path):
    from lmx.parallel import single_device_mesh
    from lmx.train import RunConfig, TrainState, compile_step, run

    x, y = _data(rng)
    init, step = api.make_fit_step(x, y, 1, learning_rate=0.1)
    params, opt_state = init(0.5, 0.3, 0.5)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    compiled = compile_step(step, donate=False)
    cfg = dict(steps=STEPS, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=5, progress=False)
    mesh = single_device_mesh()
    first = run(state, compiled, lambda s: None, RunConfig(**cfg, halt_after=9), mesh=mesh)
    assert first.step == 9
    assert (tmp_path / "ckpt" / "9").is_dir()
    # a different starting state: only a resume from the step-9 checkpoint gives fit's result
    other = state.replace(params=init(3.0, 2.0, 0.2)[0])
    resumed = run(other, compiled, lambda s: None, RunConfig(**cfg), mesh=mesh)
    assert resumed.step == STEPS
    res = api.fit(x, y, 1, lengthscale=0.5, variance=0.3, noise=0.5, steps=STEPS,
                  learning_rate=0.1)
    np.testing.assert_allclose(np.exp(np.asarray(resumed.state.params)),
                               [res.lengthscale, res.variance, res.noise], rtol=1e-12)
    np.testing.assert_allclose(resumed.losses, res.losses, rtol=1e-12)


def test_fit_step_checks_its_inputs(rng):
    x, y = _data(rng)
    init, _ = api.make_fit_step(x, y, 1)
    with pytest.raises(ValueError, match="noise must be > 0"):
        init(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="scalar noise"):
        init(1.0, 1.0, np.full(150, 0.1))
    with pytest.raises(ValueError, match="lengthscale"):
        init(-1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="method"):
        api.make_fit_step(x, y, 1, method="nope")
    with pytest.raises(ValueError, match="steps"):
        api.fit(x, y, 1, steps=0)
