"""Benchmark ``gp``: the public API of :mod:`gp.api` vs tinygp's quasisep solver (CPU, float64).

Only public functions are timed, called as a user calls them, on **unsorted** and **sorted**
inputs (``x ~ U(0, n/10)``, ``ell = 1, s2 = 1, noise = 0.01``), with tinygp in the same
rounds (:func:`benchmarks.common.timeit_interleaved`: one call of each contender per round,
median after warm-up, compile excluded). All arrays are JAX arrays already on the device.

tinygp's quasisep solver rejects unsorted input (it checks the order in a host callback and
raises; the run records what it does in ``tinygp_on_unsorted_input``). So on unsorted input the
baseline is what its user must run, ``tinygp+sort``: ``numpy.argsort`` on the host (the faster
of numpy's and JAX's sort on CPU; both timed in the ``argsort`` rows, next to
:func:`gp.api.argsort`), the gather, then tinygp. ``tinygp`` rows time it on the sorted copy
with the sort not charged (``ratio_vs_tinygp_presorted``). ``RATIO_DEFINITION`` is stored in
the result.

Rows (``summary``):
* ``task=lml``: ``api.log_marginal_likelihood(x, y, q, ell, s2, noise)`` called eagerly (its
  host-side checks, the sortedness check and, for unsorted input, the sort included);
  ``lml+grad``: ``jax.jit(jax.value_and_grad(loss))(p, x, y)`` with ``loss`` calling the public
  log-likelihood on ``(log ell, log s2, log noise)`` (``x``, ``y`` traced: the in-program
  sortedness check and ``lax.cond``). tinygp: ``jax.jit`` of ``GaussianProcess(...)
  .log_probability(y)`` (and its ``value_and_grad``) with ``x``, ``y`` as arguments.
  ``dense`` (``method="dense"``, ``n <= dense_max``) checks the value. ``ratio_vs_tinygp`` =
  our time / the baseline's (``baseline`` field) in the same rounds; ``rel_err_vs_tinygp``
  compares values.
* ``task=predict-mean+var``: default end to end, ``api.predict(api.condition(x, y, ...), t,
  return_var=True)`` at ``m`` test points; ``predict-query``: only ``api.predict`` on an existing
  posterior. tinygp: mean and variance at new points from one augmented sorted GP with noise
  1e12 at the test points (its direct ``variance`` would build a dense ``n x m`` matrix),
  jitted, data as arguments; the host work its user does (sorting unsorted data, merging the
  sorted test points in, the index arrays) is timed with it.
* ``task=co2``: hyperparameters learned with ``api.fit`` on statsmodels' CO2 series
  (de-trended), held-out RMSE; plot ``gp_co2.png``. ``gp_scaling.png``: log-log time vs n.
"""
from __future__ import annotations

import logging
import pathlib
import time

import numpy as np

log = logging.getLogger(__name__)
ELL, S2, NOISE = 1.0, 1.0, 0.01
TINYGP_JITTER = 1.4901161193847656e-08  # tinygp adds sqrt(eps) to the diagonal it conditions
RATIO_DEFINITION = (
    "ratio_vs_tinygp = our median time / the baseline's median time in the same interleaved "
    "rounds. Baseline for sorted input: tinygp on it. Baseline for unsorted input: "
    "'tinygp+sort', numpy.argsort on the host + gather + tinygp (tinygp's quasisep solver "
    "rejects unsorted input, see tinygp_on_unsorted_input). ratio_vs_tinygp_presorted divides "
    "by tinygp given the sorted copy with its sort not charged. Prediction baselines include "
    "merging the (sorted) test points into the data on the host.")


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, n / 10.0, n)
    y = np.sin(x) + 0.3 * np.sin(0.31 * x) + 0.1 * rng.normal(size=n)
    return x, y


def _tiny_kernel(q: int, ell, s2):
    from tinygp.kernels import quasisep

    import jax.numpy as jnp

    k = {0: quasisep.Exp, 1: quasisep.Matern32, 2: quasisep.Matern52}[q]
    return k(scale=ell, sigma=jnp.sqrt(s2))


def _inputs(x, y, layout):
    import jax.numpy as jnp

    if layout == "sorted":
        o = np.argsort(x)
        x, y = x[o], y[o]
    return jnp.asarray(x), jnp.asarray(y)


def _user_sort(x, *vs):
    """What a tinygp user must do with unsorted input: ``numpy.argsort`` on the host (measured
    4-6x faster than ``jnp.argsort`` on this CPU, see :func:`_bench_sorts`) and a gather."""
    xn = np.asarray(x)
    o = np.argsort(xn)
    return (xn[o],) + tuple(np.asarray(v)[o] for v in vs)


def _tinygp_on_unsorted():
    """tinygp's quasisep solver on unsorted input: what it does (it checks the order with a
    host callback and raises), recorded in the result."""
    import jax
    import jax.numpy as jnp
    from tinygp import GaussianProcess

    x, y = _data(64)
    f = jax.jit(lambda x, y: GaussianProcess(_tiny_kernel(1, ELL, S2), x, diag=NOISE)
                .log_probability(y))
    quiet = logging.getLogger("jax._src.debugging")   # it logs the callback's traceback
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return f"returned {float(f(jnp.asarray(x), jnp.asarray(y))):.6g} (no error)"
    except Exception as e:  # noqa: BLE001 - any failure is the finding being recorded
        msg = str(e).strip().splitlines()[-1][:160]
        return f"raised {type(e).__name__}: {msg}"
    finally:
        quiet.setLevel(level)


def _bench_sorts(cfg, rows, timing):
    """The two sorts a tinygp user could call on unsorted ``x`` (host numpy vs jitted JAX), and
    ours (:func:`gp.api.argsort`), interleaved."""
    import jax
    import jax.numpy as jnp

    from gp import api

    jsort = jax.jit(jnp.argsort)
    for n in cfg["ns"]:
        n = int(n)
        x = _data(n)[0]
        xj = jnp.asarray(x)
        reps = cfg["repeats"] if n < 3e5 else cfg.get("repeats_large", cfg["repeats"])
        res = timing({"numpy.argsort": lambda: np.argsort(x),
                      "jnp.argsort (jit)": lambda: jsort(xj).block_until_ready(),
                      "ours (gp.api.argsort)": lambda: api.argsort(x)}, repeats=reps, warmup=1)
        base = res["numpy.argsort"]["median_s"]
        for name, r in res.items():
            rows.append({"task": "argsort", "n": n, "input": "unsorted", "method": name,
                         "time_s": r["median_s"], "ratio_vs_numpy_argsort": r["median_s"] / base})


def _bench_lml(cfg, rows, timing, block):
    import jax
    import jax.numpy as jnp
    from tinygp import GaussianProcess

    from gp import api

    p0 = jnp.log(jnp.array([ELL, S2, NOISE]))
    curves = {}
    for q in cfg["qs"]:
        def tiny(p, xs, ys, q=q):
            e = jnp.exp(p)
            return GaussianProcess(_tiny_kernel(q, e[0], e[1]), xs, diag=e[2]).log_probability(ys)

        def ours(p, x, y, q=q):
            e = jnp.exp(p)
            return api.log_marginal_likelihood(x, y, q, e[0], e[1], e[2])

        tiny_f, tiny_vg = jax.jit(tiny), jax.jit(jax.value_and_grad(tiny))
        ours_vg = jax.jit(jax.value_and_grad(ours))
        for n in cfg["ns"]:
            n = int(n)
            x, y = _data(n)
            xs_s, ys_s = _inputs(x, y, "sorted")
            reps = cfg["repeats"] if n < 3e5 else cfg.get("repeats_large", cfg["repeats"])
            ref = float(tiny_f(p0, xs_s, ys_s))
            for layout in cfg["layouts"]:
                log.info("gp lml q=%d n=%d %s", q, n, layout)
                xs, ys = _inputs(x, y, layout)
                f = {"ours": lambda: block(api.log_marginal_likelihood(xs, ys, q, ELL, S2, NOISE)),
                     "tinygp": lambda: block(tiny_f(p0, xs_s, ys_s))}
                vg = {"ours": lambda: block(ours_vg(p0, xs, ys)),
                      "tinygp": lambda: block(tiny_vg(p0, xs_s, ys_s))}
                if layout == "unsorted":
                    # tinygp rejects unsorted input: its user sorts first (charged)
                    f["tinygp+sort"] = lambda: block(tiny_f(p0, *_user_sort(xs, ys)))
                    vg["tinygp+sort"] = lambda: block(tiny_vg(p0, *_user_sort(xs, ys)))
                if n <= cfg["dense_max"]:
                    f["dense"] = lambda: block(api.log_marginal_likelihood(
                        xs, ys, q, ELL, S2, NOISE, method="dense"))
                vals = {k: float(fn()) for k, fn in f.items()}
                for task, fns in (("lml", f), ("lml+grad", vg)):
                    t = timing(fns, repeats=reps, warmup=1)
                    base = "tinygp+sort" if layout == "unsorted" else "tinygp"
                    for name, r in t.items():
                        row = {"task": task, "q": q, "n": n, "input": layout, "method": name,
                               "time_s": r["median_s"], "baseline": base,
                               "ratio_vs_tinygp": r["median_s"] / t[base]["median_s"],
                               "ratio_vs_tinygp_presorted": r["median_s"]
                               / t["tinygp"]["median_s"]}
                        if task == "lml":
                            row["rel_err_vs_tinygp"] = abs(vals[name] - ref) / abs(ref)
                        rows.append(row)
                        curves.setdefault((q, f"{name} ({layout})", task), []).append(
                            (n, r["median_s"]))
    return curves


def _bench_predict(cfg, rows, timing, block):
    import jax
    import jax.numpy as jnp
    from tinygp import GaussianProcess

    from gp import api

    m = int(cfg["m_test"])
    for q in cfg.get("predict_qs", [2]):
        kern = _tiny_kernel(q, ELL, S2)

        @jax.jit
        def tiny_mv(ys, xa, diag_a, obs, sel, kern=kern):
            ya = jnp.zeros(xa.shape[0]).at[obs].set(ys)
            c = GaussianProcess(kern, xa, diag=diag_a).condition(ya).gp
            return c.loc[sel], c.variance[sel] - TINYGP_JITTER

        def tiny_user(x, y, t, presorted):
            """tinygp from the user's arrays: sort the data (unless known sorted), merge the
            sorted test points in (a stable sort of two sorted runs: one merge), flag them with
            noise 1e12, condition once."""
            xn, yn = (np.asarray(x), np.asarray(y)) if presorted else _user_sort(x, y)
            xa = np.concatenate([xn, np.asarray(t)])
            order = np.argsort(xa, kind="stable")
            is_test = order >= xn.shape[0]
            return tiny_mv(yn, xa[order], np.where(is_test, 1e12, NOISE),
                           np.nonzero(~is_test)[0], np.nonzero(is_test)[0])

        for n in cfg["predict_ns"]:
            n = int(n)
            x, y = _data(n, seed=1)
            t = jnp.asarray(np.sort(np.random.default_rng(2).uniform(0.0, n / 10.0, m)))
            xs_s, ys_s = _inputs(x, y, "sorted")
            m_t, v_t = tiny_user(xs_s, ys_s, t, True)
            reps = cfg["repeats"] if n < 3e5 else cfg.get("repeats_large", cfg["repeats"])
            for layout in cfg["layouts"]:
                log.info("gp predict q=%d n=%d %s", q, n, layout)
                xs, ys = _inputs(x, y, layout)

                def ours_mv():
                    post = api.condition(xs, ys, q, ELL, S2, NOISE)
                    return block(api.predict(post, t, return_var=True))

                post = api.condition(xs, ys, q, ELL, S2, NOISE)
                m_o, v_o = ours_mv()
                errs = {"rel_err_vs_tinygp": float(jnp.max(jnp.abs(m_o - m_t))
                                                   / jnp.max(jnp.abs(m_t))),
                        "var_abs_err_vs_tinygp": float(jnp.max(jnp.abs(v_o - v_t)))}
                base = "tinygp+sort" if layout == "unsorted" else "tinygp"
                fns = {"ours": ours_mv,
                       "ours query": lambda: block(api.predict(post, t, return_var=True)),
                       "tinygp": lambda: block(tiny_user(xs_s, ys_s, t, True))}
                if layout == "unsorted":
                    fns["tinygp+sort"] = lambda: block(tiny_user(xs, ys, t, False))
                res = timing(fns, repeats=reps, warmup=1)
                for name in fns:
                    row = {"task": "predict-query" if name == "ours query" else "predict-mean+var",
                           "q": q, "n": n, "m": m, "input": layout, "method": name,
                           "time_s": res[name]["median_s"], "baseline": base,
                           "ratio_vs_tinygp": res[name]["median_s"] / res[base]["median_s"],
                           "ratio_vs_tinygp_presorted": res[name]["median_s"]
                           / res["tinygp"]["median_s"]}
                    if name == "ours":
                        row.update(errs)
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
                slope = (float(np.polyfit(np.log(n), np.log(tm), 1)[0]) if len(n) > 1
                         else float("nan"))
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
    from benchmarks.common import block, timeit_interleaved

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    tinygp_unsorted = _tinygp_on_unsorted()
    log.info("tinygp on unsorted input: %s", tinygp_unsorted)
    if "unsorted" in config["layouts"]:
        _bench_sorts(config, rows, timeit_interleaved)
    curves = _bench_lml(config, rows, timeit_interleaved, block)
    _bench_predict(config, rows, timeit_interleaved, block)
    plots = []
    if config.get("co2_steps", 0) > 0:
        plots.append(_bench_co2(config, rows, out_dir))
    scaling_path, slopes = _plot_scaling(curves, out_dir)
    plots.append(scaling_path)
    for r in rows:
        r.pop("value", None)
    return {"summary": rows, "plots": [str(p) for p in plots], "slopes": slopes,
            "tinygp_on_unsorted_input": tinygp_unsorted,
            "ratio_definition": RATIO_DEFINITION}
