import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.parallel import (ONEDNN_MATMUL_OPTIONS, ONEDNN_VERIFIED_JAXLIB, TunedJit, cpu_compiler_options,
                          onednn_fusions_supported)

ONEDNN = bool(cpu_compiler_options())


def _arrays():
    r = np.random.RandomState(0)
    return (jnp.asarray(r.randn(64, 48), jnp.float32), jnp.asarray(r.randn(64, 48), jnp.float32),
            jnp.asarray(r.randn(48, 32), jnp.float32), jnp.asarray(r.randn(32), jnp.float32))


def test_cpu_compiler_options_are_onednn_on_a_verified_jaxlib():
    assert jax.default_backend() == "cpu"
    a, _, c, _ = _arrays()
    if jax.lib.__version__ not in ONEDNN_VERIFIED_JAXLIB:
        assert os.environ.get("LMX_ONEDNN_MATMULS") == "1" or cpu_compiler_options() == {}
        return
    assert cpu_compiler_options() == ONEDNN_MATMUL_OPTIONS
    fast = TunedJit(jnp.matmul)
    assert "onednn" in fast.compile(a, c).as_text()
    exact = np.asarray(a, np.float64) @ np.asarray(c, np.float64)
    np.testing.assert_allclose(np.asarray(fast(a, c)), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast(a, c)), np.asarray(jax.jit(jnp.matmul)(a, c)), rtol=1e-5, atol=1e-5)


def test_env_override_turns_onednn_off_and_rejects_bad_values(monkeypatch):
    try:
        monkeypatch.setenv("LMX_ONEDNN_MATMULS", "0")
        cpu_compiler_options.cache_clear()
        assert cpu_compiler_options() == {}
        monkeypatch.setenv("LMX_ONEDNN_MATMULS", "yes")
        cpu_compiler_options.cache_clear()
        with pytest.raises(ValueError, match="LMX_ONEDNN_MATMULS"):
            cpu_compiler_options()
    finally:
        monkeypatch.undo()
        cpu_compiler_options.cache_clear()


def test_tuned_jit_keeps_supported_fusions_and_caches_per_signature():
    a, _, c, bias = _arrays()
    f = TunedJit(lambda a, c, bias: jnp.tanh(a @ c + bias))
    first = f.compile(a, c, bias)
    assert f.compile(a, c, bias) is first
    assert f.compile(a[:16], c, bias) is not first  # a new shape is a new program
    assert ("onednn" in first.as_text()) == ONEDNN
    np.testing.assert_allclose(np.asarray(f(a, c, bias)), np.tanh(np.asarray(a) @ np.asarray(c) + np.asarray(bias)),
                               rtol=1e-5, atol=1e-5)
    plain = TunedJit(lambda a, c, bias: jnp.tanh(a @ c + bias), compiler_options={})
    assert plain.compiler_options == {} and "onednn" not in plain.compile(a, c, bias).as_text()


# Programs whose oneDNN fusion would take an op feeding the dot, or two dots: with jaxlib 0.10.2
# these die with SIGILL on their first run, so they run in a child process.
CRASHERS = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from lmx.parallel import TunedJit
    r = np.random.RandomState(0)
    a, b = (jnp.asarray(r.randn(64, 48), jnp.float32) for _ in range(2))
    c = jnp.asarray(r.randn(48, 32), jnp.float32)
    fns = {"mul_pre": lambda a, b, c: (a * b) @ c, "exp_pre": lambda a, b, c: jnp.exp(a) @ c,
           "two_dots": lambda a, b, c: (a @ c) * (b @ c[:, ::-1])}
    out = {}
    for name, fn in fns.items():
        f = TunedJit(fn)
        got = np.asarray(f(a, b, c))
        ref = np.asarray(jax.jit(fn, compiler_options={})(a, b, c))
        out[name] = {"onednn": "onednn" in f.compile(a, b, c).as_text(),
                     "err": float(np.abs(got - ref).max())}
    print("@@" + json.dumps(out))
''')


def test_tuned_jit_falls_back_where_onednn_fusions_would_crash():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", CRASHERS], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"child exited {p.returncode}: {p.stderr[-2000:]}"
    out = json.loads(p.stdout[p.stdout.rindex("@@") + 2:])
    assert set(out) == {"mul_pre", "exp_pre", "two_dots"}
    for name, r in out.items():
        assert not r["onednn"], name
        assert r["err"] == 0.0, name


HLO_OK = """
%fused_dot (p0: f32[4,8], p1: f32[8,2], p2: f32[4,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %p2 = f32[4,2]{1,0} parameter(2)
  ROOT %add.1 = f32[4,2]{1,0} add(%dot.1, %p2)
}

ENTRY %main (a: f32[4,8], b: f32[8,2], c: f32[4,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %c = f32[4,2]{1,0} parameter(2)
  ROOT %onednn_fusion = f32[4,2]{1,0} fusion(%a, %b, %c), kind=kCustom, calls=%fused_dot, backend_config={"fusion_config":{"kind":"__onednn_fusion"}}
}
"""


def test_onednn_fusions_supported_reads_the_fused_computations():
    assert onednn_fusions_supported(HLO_OK)
    assert onednn_fusions_supported("ENTRY %main () -> f32[] {\n  ROOT %c = f32[] constant(1)\n}\n")
    pre_op = HLO_OK.replace("%dot.1 = f32[4,2]{1,0} dot(%p0, %p1)",
                            "%e = f32[4,8]{1,0} exponential(%p0)\n  %dot.1 = f32[4,2]{1,0} dot(%e, %p1)")
    assert not onednn_fusions_supported(pre_op)
    two_dots = HLO_OK.replace("ROOT %add.1 = f32[4,2]{1,0} add(%dot.1, %p2)",
                              "%dot.2 = f32[4,2]{1,0} dot(%p0, %p1)\n  ROOT %add.1 = f32[4,2]{1,0} add(%dot.1, %dot.2)")
    assert not onednn_fusions_supported(two_dots)
    assert not onednn_fusions_supported(HLO_OK.replace("calls=%fused_dot", "calls=%missing"))
