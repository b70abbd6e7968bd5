"""gp tests run in float64 (the package refuses float32 without x64, see gp.validate).

x64 is switched on per module of this folder and restored after each (a package-scoped fixture
of a folder without __init__.py lives until the session ends): left on, it would change the
dtypes (and results) of every later test in the same pytest process.
"""
import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def _x64():
    old = jax.config.values["jax_enable_x64"]
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
