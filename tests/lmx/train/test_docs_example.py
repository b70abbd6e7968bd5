"""The user-level example of docs/lm_core.md ("Your own loop, every wing") runs as written on the
8 fake devices: LM, KD (fused ATKD), reward (InfoRM) and Concrete TA / AM / AdaMerging steps."""
import pathlib
import re

import jax
import numpy as np
import pytest

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "lm_core.md"


@pytest.mark.slow
def test_own_loop_example_runs():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    text = DOC.read_text()
    section = text[text.index("### Your own loop, every wing"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    # every wing ended with trained state on the FSDP mesh and finite metrics
    assert np.isfinite(float(scope["metrics"]["loss"]))
    assert scope["lm"].wqkv[...].sharding.spec[1] == "fsdp"
    assert scope["merged"]["w"].shape == (16, 8)
    assert int(scope["state"].step) == 3
