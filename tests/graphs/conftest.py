"""Shared fixtures for the graphs tests.

Compiling is most of these tests' cost on CPU, so this folder compiles with
``jax_disable_most_optimizations`` (XLA backend optimisation level 0: same HLO semantics, less
LLVM work) and restores the previous value when the folder is done, so other folders are untouched.
"""
import jax
import pytest

from graphs import data


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="package")
def mutag():
    return data.load_mutag()
