"""Fused chunked path == unfused losses."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.kd import (ATKDConfig, KDConfig, KINDS, atkd_loss, auto_chunk_tokens,
                    fused_linear_kd_loss, kd_loss)

B, T, H_S, H_T, V = 2, 9, 8, 12, 24


def _setup(seed=0, bias=False):
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    hs = jax.random.normal(k[0], (B, T, H_S))
    ht = jax.random.normal(k[1], (B, T, H_T))
    ws = 0.7 * jax.random.normal(k[2], (H_S, V))
    wt = 0.9 * jax.random.normal(k[3], (H_T, V))
    y = np.array(jax.random.randint(k[4], (B, T), 0, V))
    y[0, 2:4] = -100
    bs = 0.3 * jax.random.normal(k[5], (V,)) if bias else None
    bt = 0.3 * jax.random.normal(k[6], (V,)) if bias else None
    return hs, ws, ht, wt, jnp.asarray(y), bs, bt


def _unfused(cfg, hs, ws, ht, wt, labels, bs=None, bt=None, **kw):
    zs = hs @ ws + (0.0 if bs is None else bs)
    zt = ht @ wt + (0.0 if bt is None else bt)
    fields = dataclasses.asdict(cfg)
    if isinstance(cfg, ATKDConfig):
        return atkd_loss(zs, zt, labels, **fields, **kw)
    return kd_loss(zs, zt, labels, **fields, **kw)


def _check(cfg, chunk_sizes, impls=("custom_vjp", "scan_remat"), bias=False, seed=0,
           remat_chunks=None, **kw):
    hs, ws, ht, wt, labels, bs, bt = _setup(seed, bias)
    args = (hs, ws, bs) if bias else (hs, ws)

    def unf(hs, ws, bs=None):
        return _unfused(cfg, hs, ws, ht, wt, labels, bs, bt, **kw)

    v0, g0 = jax.jit(jax.value_and_grad(unf, range(len(args))))(*args)
    for impl in impls:
        sizes = remat_chunks if impl == "scan_remat" and remat_chunks else chunk_sizes
        for cs in sizes:
            def fused(hs, ws, bs=None, impl=impl, cs=cs):
                return fused_linear_kd_loss(hs, ws, ht, wt, labels, loss=cfg, student_bias=bs,
                                            teacher_bias=bt, chunk_size=cs, impl=impl, **kw)

            v1, g1 = jax.jit(jax.value_and_grad(fused, range(len(args))))(*args)
            np.testing.assert_allclose(v1, v0, rtol=1e-5, err_msg=f"{impl} {cs}")
            for a, b in zip(g1, g0):
                scale = float(jnp.abs(b).max())
                np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=f"{impl} {cs}")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused_every_divergence(kind):
    _check(KDConfig(kind=kind, temperature=1.5), chunk_sizes=(3,), impls=("custom_vjp",))


def test_fused_chunk_sizes_bias_hard_term():
    cfg = KDConfig(kind="gjsd", beta=0.3, hard_weight=0.4, soft_weight=0.6)
    _check(cfg, chunk_sizes=(1, 5, None), bias=True, remat_chunks=(T - 1,))


def test_fused_atkd_two_pass_equals_single_pass():
    # T - 1 = 8 scored positions: chunks of 1, 7 (does not divide) and all of them.
    _check(ATKDConfig(easy_weight=0.3), chunk_sizes=(1, 7, T - 1), remat_chunks=(7,))
    _check(ATKDConfig(direction="reverse"), chunk_sizes=(3,), impls=("custom_vjp",))


def test_fused_atkd_scopes_and_normalisations():
    one = ("custom_vjp",)
    _check(ATKDConfig(split_scope="sequence", normalize="global"), chunk_sizes=(3,), impls=one)
    _check(ATKDConfig(split_groups=2, unc_weighted_nckd=True), chunk_sizes=(4,), impls=one)
    _check(ATKDConfig(normalize="global"), chunk_sizes=(3,), impls=one, reduction="sum")


def test_fused_aux_matches_unfused():
    hs, ws, ht, wt, labels, _, _ = _setup(1)
    cfg = ATKDConfig()
    _, a0 = _unfused(cfg, hs, ws, ht, wt, labels, return_aux=True)
    for impl in ("custom_vjp", "scan_remat"):
        _, a1 = fused_linear_kd_loss(hs, ws, ht, wt, labels, loss=cfg, impl=impl, chunk_size=4,
                                     return_aux=True)
        for key in ("n_easy", "n_hard", "n_scored", "threshold", "mean_unc", "mean_tckd_hard",
                    "mean_nckd_easy", "mean_nckd_hard"):
            np.testing.assert_allclose(a1[key], a0[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_fused_flat_rows_valid_vocab_and_bf16():
    hs, ws, ht, wt, labels, _, _ = _setup(2)
    # [N, H] rows without shift; the teacher head has 5 extra (garbage) columns.
    hs2, ht2, y2 = hs.reshape(-1, H_S), ht.reshape(-1, H_T), labels.reshape(-1)
    wt_big = jnp.concatenate([wt, 40.0 * jnp.ones((H_T, 5))], axis=1)
    cfg = KDConfig(kind="rkl", valid_vocab_size=V)
    v0 = kd_loss(hs2 @ ws, ht2 @ wt, y2, kind="rkl", shift=False)
    v1 = fused_linear_kd_loss(hs2, ws, ht2, wt_big, y2, loss=cfg, shift=False, chunk_size=4)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    # bf16 hidden states and heads: logits are formed in float32, the result is close.
    vb = fused_linear_kd_loss(hs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16),
                              ht.astype(jnp.bfloat16), wt.astype(jnp.bfloat16), labels,
                              chunk_size=4)
    g = jax.grad(lambda w: fused_linear_kd_loss(hs.astype(jnp.bfloat16), w,
                                                ht.astype(jnp.bfloat16),
                                                wt.astype(jnp.bfloat16), labels))(
        ws.astype(jnp.bfloat16))
    assert vb.dtype == jnp.float32 and g.dtype == jnp.bfloat16
    np.testing.assert_allclose(vb, _unfused(KDConfig(), hs, ws, ht, wt, labels), rtol=3e-2)


def test_fused_masked_rows_and_all_masked():
    hs, ws, ht, wt, labels, _, _ = _setup(3)
    f = jax.jit(jax.value_and_grad(lambda h, y: fused_linear_kd_loss(h, ws, ht, wt, y,
                                                                     loss=ATKDConfig(),
                                                                     chunk_size=4)))
    v0, g0 = f(hs, labels)
    v1, g1 = f(hs.at[0, 1:3].set(1e3), labels)  # positions predicting the ignored labels
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, atol=1e-7)
    v2, g2 = f(hs, jnp.full_like(labels, -100))
    assert float(v2) == 0.0 and float(jnp.abs(g2).max()) == 0.0


def test_auto_chunk_heuristic():
    assert auto_chunk_tokens(8192, 49152, 576) == 512
    assert auto_chunk_tokens(10, 49152, 576) == 512
    assert auto_chunk_tokens(10 ** 7, 1000, 1000) == 1024
    assert auto_chunk_tokens(70_000, 49152, 576) == 1024
