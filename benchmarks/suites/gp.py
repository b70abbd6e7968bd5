"""Benchmark ``gp``: kernel-packet GP vs tinygp's quasisep solver vs dense Cholesky (CPU, float64).

Rows (``summary``):
* ``task=lml`` / ``lml+grad``: log marginal likelihood (and ``jax.value_and_grad`` w.r.t.
  ``(log ell, log s2, log noise)``) on sorted ``x ~ U(0, n/10)``, ``ell = 1, s2 = 1, noise =
  0.01`` (spec §10 setup) for ``ours-kp`` (packets, forced), ``ours-ss`` (our Kalman filter,
  also what ``method="auto"`` uses for the likelihood), ``tinygp`` (quasisep Matern32/52) and
  ``dense`` (Cholesky, ``n <= dense_max``). ``rel_err`` compares each value with tinygp's.
* ``task=predict-mean`` / ``predict-mean+var``: condition on ``n`` points and predict at ``m``
  test points, timed end to end; ``predict-query`` times only our per-point query after
  conditioning. ``ours-kp`` conditions with packets (mean) and, for variances, the RTS smoother
  too (``ours-kp+ss``); ``ours-ss`` takes mean and variance from the smoother alone. tinygp's
  mean uses ``condition(y, X_test).gp.loc`` (O(n + m)); its variance at
  new points uses one augmented sorted GP with noise 1e12 at the test points (its direct
  ``variance`` would build a dense n x m matrix).
* ``task=co2``: hyperparameters learned with optax on statsmodels' CO2 series (de-trended),
  held-out RMSE; plot ``gp_co2.png``. ``gp_scaling.png``: log-log time vs n with fitted slopes.

Timings: :func:`benchmarks.common.timeit` (median after warm-up); compile time excluded.
"""
from __future__ import annotations

import math
import pathlib
import time

import numpy as np


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, n / 10.0, n))
    y = np.sin(x) + 0.3 * np.sin(0.31 * x) + 0.1 * rng.normal(size=n)
    return x, y


def _lml_fns(q: int, x, y):
    """Jitted ``p -> lml`` and ``p -> (lml, grad)`` for each method on sorted data."""
    import jax
    import jax.numpy as jnp
    from tinygp import GaussianProcess
    from tinygp.kernels import quasisep

    from gp import api, dense

    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def ours(method):
        def f(p):
            e = jnp.exp(p)
            return api._lml(xs, ys, q, e[0], e[1], e[2], None, method)
        return f

    tk = {1: quasisep.Matern32, 2: quasisep.Matern52}[q]

    def tiny(p):
        e = jnp.exp(p)
        gp = GaussianProcess(tk(scale=e[0], sigma=jnp.sqrt(e[1])), xs, diag=e[2])
        return gp.log_probability(ys)

    def dense_f(p):
        e = jnp.exp(p)
        return dense.log_marginal_likelihood(xs, ys, q, e[0], e[1], e[2])

    fns = {"ours-kp": ours("kp"), "ours-ss": ours("ss"), "tinygp": tiny, "dense": dense_f}
    return {k: (jax.jit(f), jax.jit(jax.value_and_grad(f))) for k, f in fns.items()}


def _bench_lml(cfg, rows, timeit, block):
    import jax.numpy as jnp

    p0 = jnp.log(jnp.array([1.0, 1.0, 0.01]))
    curves = {}
    for q in cfg["qs"]:
        for n in cfg["ns"]:
            x, y = _data(int(n))
            fns = _lml_fns(q, x, y)
            ref = None
            for name, (f, vg) in fns.items():
                if name == "dense" and n > cfg["dense_max"]:
                    continue
                if name == "ours-ss" and n > cfg.get("ss_max", math.inf):
                    continue
                reps = cfg["repeats"] if n < 3e5 else max(1, cfg["repeats"] // 2)
                val = float(block(f(p0)))
                if name == "tinygp":
                    ref = val
                t1 = timeit(lambda: block(f(p0)), repeats=reps, warmup=1)["median_s"]
                t2 = timeit(lambda: block(vg(p0)), repeats=reps, warmup=1)["median_s"]
                rows.append({"task": "lml", "q": q, "n": int(n), "method": name, "time_s": t1,
                             "value": val})
                rows.append({"task": "lml+grad", "q": q, "n": int(n), "method": name,
                             "time_s": t2})
                curves.setdefault((q, name, "lml"), []).append((n, t1))
                curves.setdefault((q, name, "lml+grad"), []).append((n, t2))
            for r in rows:
                if r["task"] == "lml" and r["q"] == q and r["n"] == int(n) and ref is not None:
                    r["rel_err_vs_tinygp"] = abs(r["value"] - ref) / abs(ref)
    return curves


def _bench_predict(cfg, rows, timeit, block):
    import jax
    import jax.numpy as jnp
    from tinygp import GaussianProcess
    from tinygp.kernels import quasisep

    from gp import api

    q = 2
    m = int(cfg["m_test"])
    for n in cfg["predict_ns"]:
        n = int(n)
        x, y = _data(n, seed=1)
        rng = np.random.default_rng(2)
        t = np.sort(rng.uniform(0.0, n / 10.0, m))
        xs, ys, ts = jnp.asarray(x), jnp.asarray(y), jnp.asarray(t)
        ell, s2, noise = 1.0, 1.0, 0.01

        @jax.jit
        def ours_mean(ys):
            post = api._condition_core(xs, ys, ell, s2, noise, None, q=q, method="kp",
                                       with_variance=False, kp_possible=True)
            return api._predict_core(post, ts, return_var=False, include_noise=False)

        @jax.jit
        def ours_mv(ys):
            post = api._condition_core(xs, ys, ell, s2, noise, None, q=q, method="kp",
                                       with_variance=True, kp_possible=True)
            return api._predict_core(post, ts, return_var=True, include_noise=False)

        @jax.jit
        def ss_mv(ys):
            post = api._condition_core(xs, ys, ell, s2, noise, None, q=q, method="ss",
                                       with_variance=True, kp_possible=False)
            return api._predict_core(post, ts, return_var=True, include_noise=False)

        post = api._condition_jit(xs, ys, ell, s2, noise, None, q=q, method="kp",
                                  with_variance=True, kp_possible=True)
        query_mean = jax.jit(lambda p: api._predict_core(p, ts, return_var=False,
                                                         include_noise=False))
        query_mv = jax.jit(lambda p: api._predict_core(p, ts, return_var=True,
                                                       include_noise=False))
        kern = quasisep.Matern52(scale=ell, sigma=math.sqrt(s2))

        @jax.jit
        def tiny_mean(ys):
            gp = GaussianProcess(kern, xs, diag=noise)
            return gp.condition(ys, ts).gp.loc

        order = np.argsort(np.concatenate([x, t]), kind="stable")
        xa = jnp.asarray(np.concatenate([x, t])[order])
        is_test = np.concatenate([np.zeros(n, bool), np.ones(m, bool)])[order]
        diag_a = jnp.asarray(np.where(is_test, 1e12, noise))
        sel = jnp.asarray(np.nonzero(is_test)[0])

        @jax.jit
        def tiny_mv(ys):
            ya = jnp.zeros(n + m).at[jnp.asarray(np.nonzero(~is_test)[0])].set(ys)
            gp = GaussianProcess(kern, xa, diag=diag_a)
            c = gp.condition(ya).gp
            return c.loc[sel], c.variance[sel]

        m_ours = ours_mean(ys)
        m_tiny = tiny_mean(ys)
        _, v_ours = ours_mv(ys)
        _, v_tiny = tiny_mv(ys)
        m_ss, v_ss = ss_mv(ys)
        # tinygp's conditioned variance includes its sqrt(eps) jitter on the test points
        v_err = float(jnp.max(jnp.abs(v_ours - (v_tiny - 1.4901161193847656e-08))))
        mean_err = float(jnp.max(jnp.abs(m_ours - m_tiny)) / jnp.max(jnp.abs(m_tiny)))
        ss_mean_err = float(jnp.max(jnp.abs(m_ss - m_tiny)) / jnp.max(jnp.abs(m_tiny)))
        ss_v_err = float(jnp.max(jnp.abs(v_ss - (v_tiny - 1.4901161193847656e-08))))
        reps = cfg["repeats"] if n < 3e5 else max(1, cfg["repeats"] // 2)
        for task, name, fn in (("predict-mean", "ours-kp", lambda: block(ours_mean(ys))),
                               ("predict-mean", "tinygp", lambda: block(tiny_mean(ys))),
                               ("predict-mean+var", "ours-kp+ss", lambda: block(ours_mv(ys))),
                               ("predict-mean+var", "ours-ss", lambda: block(ss_mv(ys))),
                               ("predict-mean+var", "tinygp", lambda: block(tiny_mv(ys))),
                               ("predict-query", "ours-kp mean", lambda: block(query_mean(post))),
                               ("predict-query", "ours mean+var", lambda: block(query_mv(post)))):
            row = {"task": task, "q": q, "n": n, "m": m, "method": name,
                   "time_s": timeit(fn, repeats=reps, warmup=1)["median_s"]}
            if task == "predict-mean" and name == "ours-kp":
                row["rel_err_vs_tinygp"] = mean_err
            if task == "predict-mean+var" and name == "ours-kp+ss":
                row["var_abs_err_vs_tinygp"] = v_err
            if task == "predict-mean+var" and name == "ours-ss":
                row["rel_err_vs_tinygp"] = ss_mean_err
                row["var_abs_err_vs_tinygp"] = ss_v_err
            rows.append(row)


def _bench_co2(cfg, rows, out_dir):
    from statsmodels.datasets import co2

    from gp import api

    data = co2.load_pandas().data.dropna()
    t_years = (data.index.year + (data.index.dayofyear - 1) / 365.25).to_numpy(float)
    yv = data["co2"].to_numpy(float)
    t0 = t_years.min()
    tt = t_years - t0
    split = int(0.9 * len(tt))
    # quadratic trend by least squares on the training part; the GP models the rest
    V = np.vander(tt[:split], 3)
    coef, *_ = np.linalg.lstsq(V, yv[:split], rcond=None)
    trend = np.vander(tt, 3) @ coef
    r = yv - trend
    q = 2
    t_fit = time.perf_counter()
    res = api.fit(tt[:split], r[:split], q, lengthscale=1.0, variance=1.0, noise=0.1,
                  steps=int(cfg["co2_steps"]), learning_rate=0.05)
    fit_time = time.perf_counter() - t_fit  # one run, compile included
    post = api.condition(tt[:split], r[:split], q, res.lengthscale, res.variance, res.noise)
    grid = np.linspace(tt.min(), tt.max() + 1.0, 3000)
    mu, var = api.predict(post, grid, return_var=True, include_noise=True)
    pred_test = api.predict(post, tt[split:])
    rmse = float(np.sqrt(np.mean((np.asarray(pred_test) - r[split:]) ** 2)))
    rmse_trend = float(np.sqrt(np.mean(r[split:] ** 2)))
    rows.append({"task": "co2", "q": q, "n": split, "method": "ours (auto)",
                 "fit_time_s_incl_compile": fit_time, "lengthscale_yr": float(res.lengthscale),
                 "variance": float(res.variance), "noise": float(res.noise),
                 "heldout_rmse_ppm": rmse, "trend_only_rmse_ppm": rmse_trend})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g_trend = np.vander(grid, 3) @ coef
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(tt[:split] + t0, yv[:split], ".", ms=1.5, color="k", label="train")
    ax.plot(tt[split:] + t0, yv[split:], ".", ms=1.5, color="tab:red", label="held out")
    m_ = np.asarray(mu) + g_trend
    s_ = 2 * np.sqrt(np.asarray(var))
    ax.plot(grid + t0, m_, color="tab:blue", lw=0.8, label="posterior mean")
    ax.fill_between(grid + t0, m_ - s_, m_ + s_, color="tab:blue", alpha=0.25, label="±2 sd")
    ax.set_xlabel("year")
    ax.set_ylabel("CO2 [ppm]")
    ax.set_title(f"Matérn-5/2 GP on de-trended CO2 (ell={float(res.lengthscale):.2f} yr), "
                 f"held-out RMSE {rmse:.2f} ppm")
    ax.legend(loc="upper left", fontsize=8)
    path = out_dir / "gp_co2.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_scaling(curves, out_dir: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slopes = {}
    tasks = sorted({k[2] for k in curves})
    qs = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(len(qs), len(tasks), figsize=(5 * len(tasks), 3.6 * len(qs)),
                             squeeze=False)
    for i, q in enumerate(qs):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for (qq, name, tk), pts in sorted(curves.items()):
                if qq != q or tk != task:
                    continue
                n, tm = np.array(pts, float).T
                slope = float(np.polyfit(np.log(n), np.log(tm), 1)[0]) if len(n) > 1 else float("nan")
                slopes[f"q{q}/{task}/{name}"] = slope
                ax.loglog(n, tm, "o-", label=f"{name} (slope {slope:.2f})")
            ax.set_title(f"nu={q}+1/2, {task}")
            ax.set_xlabel("n")
            ax.set_ylabel("time [s]")
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "gp_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, slopes


def run(config: dict, out_dir: pathlib.Path) -> dict:
    import jax

    # float64 only inside this suite: `python -m benchmarks quick` runs the LM suites in the
    # same process afterwards, in their own default precision
    with jax.enable_x64(True):
        return _run(config, out_dir)


def _run(config: dict, out_dir: pathlib.Path) -> dict:
    from benchmarks.common import block, timeit

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    curves = _bench_lml(config, rows, timeit, block)
    _bench_predict(config, rows, timeit, block)
    plots = []
    if config.get("co2_steps", 0) > 0:
        plots.append(_bench_co2(config, rows, out_dir))
    scaling_path, slopes = _plot_scaling(curves, out_dir)
    plots.append(scaling_path)
    for r in rows:
        r.pop("value", None)
    return {"summary": rows, "plots": [str(p) for p in plots], "slopes": slopes}
