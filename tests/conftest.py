"""Test environment: must run before anything imports jax."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Children started by tests (multi-process runs, resume-after-kill, worker scripts) import this
# checkout, not whatever lmx happens to be installed: a script puts only its own folder on
# sys.path, and an editable install may point at another clone.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _uses_sandbox(item) -> bool:
    path = pathlib.Path(str(item.fspath)).resolve()
    return (REPO / "tests" / "lmx" / "evals") in path.parents or hasattr(item.module, "Sandbox")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into node-id groups
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (the CI command) every test that starts sandboxes
    runs on one worker: the containment tests count the processes of all sandbox uids and must
    not see another worker's samples. Other tests are spread one by one."""
    for item in items:
        if _uses_sandbox(item):
            item.add_marker(pytest.mark.xdist_group("sandbox"))
