import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.models import ModelConfig, Transformer
from lmx.parallel import make_mesh
from lmx.train import (TrainConfig, accumulate_grads, causal_lm_loss, init_state, make_optimizer, make_train_step,
                       train)

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from flax import nnx
    from lmx.models import ModelConfig, Transformer
    from lmx.train import TrainConfig, causal_lm_loss, train

    def get_batch(step):
        r = np.random.RandomState(step)
        return {"tokens": r.randint(0, 64, (4, 12)).astype(np.int32)}

    ckpt, halt, log = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = TrainConfig(steps=20, lr=3e-3, warmup_steps=3, ckpt_dir=ckpt or None, ckpt_every=5,
                      halt_after=int(halt) if halt else None, log_path=log, progress=False, accum_steps=2)
    model = Transformer(ModelConfig.tiny_llama(vocab_size=64, d_model=32, d_ff=64), rngs=nnx.Rngs(0))
    res = train(model, causal_lm_loss, get_batch, cfg)
    print("LOSSES" + json.dumps(res.losses))
''')


def _run(tmp_path, ckpt, halt, log):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, ckpt, halt, str(log)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("LOSSES"))
    return json.loads(line[len("LOSSES"):])


@pytest.mark.slow
def test_resume_in_new_process_reproduces_straight_run(tmp_path):
    straight = _run(tmp_path, "", "", tmp_path / "a.jsonl")
    first = _run(tmp_path, str(tmp_path / "ckpt"), "10", tmp_path / "b.jsonl")
    assert len(first) == 10
    resumed = _run(tmp_path, str(tmp_path / "ckpt"), "", tmp_path / "b.jsonl")
    assert len(straight) == len(resumed) == 20
    np.testing.assert_allclose(resumed, straight, atol=1e-6, rtol=0)
    assert straight[-1] < straight[0]
    rows = [json.loads(l) for l in open(tmp_path / "b.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 21))


def test_train_step_default_compiler_options_match_xla_defaults():
    """The step compiled with its default options (oneDNN matmuls on CPU) gives the same loss,
    gradient norm and updated parameters as with XLA's defaults (``compiler_options={}``)."""
    model = Transformer(ModelConfig.tiny_llama(vocab_size=64, d_model=32, d_ff=64), rngs=nnx.Rngs(2))
    tx = make_optimizer(TrainConfig(steps=10, lr=1e-3))
    graphdef, state, _ = init_state(model, tx)
    batch = {"tokens": np.random.RandomState(3).randint(0, 64, (2, 4, 12)).astype(np.int32)}
    outs = []
    for options in (None, {}):
        step = make_train_step(graphdef, causal_lm_loss, tx, donate=False, compiler_options=options)
        new, m = step(state, batch, jax.random.PRNGKey(0))
        outs.append((new.params, m))
        assert int(new.step) == 1 and new.aux is state.aux
    (p_fast, m_fast), (p_xla, m_xla) = outs
    assert abs(float(m_fast["loss"]) - float(m_xla["loss"])) <= 1e-6
    assert float(m_fast["grad_norm"]) == pytest.approx(float(m_xla["grad_norm"]), rel=1e-5)
    d = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p_fast, p_xla))
    assert max(d) <= 1e-5  # 1 % of an Adam step at lr 1e-3 (Adam rescales tiny gradient entries)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p_fast, state.params))) > 1e-4


def test_accumulation_normalizes_by_global_token_count():
    """Two micro-batches with different numbers of scored tokens: the accumulated gradient is the
    gradient of the global token mean, not the mean of per-micro-batch means."""
    model = Transformer(ModelConfig.tiny_llama(vocab_size=32, d_model=32, d_ff=64), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    r = np.random.RandomState(0)
    toks = r.randint(0, 32, (2, 2, 10)).astype(np.int32)
    mask = np.ones((2, 2, 10), bool)
    mask[1, :, 4:] = False
    loss, grads, n, _ = accumulate_grads(graphdef, rest, causal_lm_loss, params, {"tokens": toks, "mask": mask},
                                         jax.random.PRNGKey(0))
    assert float(n) == 2 * 9 + 2 * 3

    def global_mean(p):
        s, c, _ = causal_lm_loss(nnx.merge(graphdef, p, rest),
                                 {"tokens": toks.reshape(4, 10), "mask": mask.reshape(4, 10)})
        return s / c
    ref_loss, ref_grads = jax.value_and_grad(global_mean)(params)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    d = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, ref_grads))
    assert max(d) < 1e-6


def test_train_on_mesh_reduces_loss_and_validates():
    model = Transformer(ModelConfig.tiny_llama(vocab_size=32, d_model=32, d_ff=64), rngs=nnx.Rngs(0))
    fixed = {"tokens": np.tile(np.arange(16, dtype=np.int32) % 32, (8, 1))}
    res = train(model, causal_lm_loss, lambda s: fixed, TrainConfig(steps=15, lr=1e-2, progress=False),
                mesh=make_mesh(4, 2, 1))
    assert res.losses[-1] < 0.5 * res.losses[0]
    with pytest.raises(ValueError, match="accum_steps"):
        train(model, causal_lm_loss, lambda s: {"tokens": np.zeros((3, 4), np.int32)},
              TrainConfig(steps=1, accum_steps=2, progress=False))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(TypeError, match="nnx.Module"):
        train({"w": 1}, causal_lm_loss, lambda s: fixed, TrainConfig(steps=1))
