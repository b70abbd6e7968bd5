"""A 2 GiB text corpus generated on the fly (``IterableDataset.from_generator``, never written or
held) is streamed, packed and distilled (KD through ``lmx.train.train``) in a fresh process whose
address space is capped after the first step at 1 GiB above what it already maps: allocating the
corpus there fails (the control), reading and training go on with bounded memory."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("stream_kd_worker.py")


@pytest.mark.slow
def test_two_gib_stream_trains_kd_steps_with_bounded_memory():
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), "2", "1"], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["corpus_gib"] == 2.0 and out["control"] == "MemoryError"
    losses = np.asarray(out["losses"])
    assert losses.shape == (4,) and np.isfinite(losses).all() and losses[-1] < losses[0]
    assert out["extra_tokens"] >= 2 * 2 ** 20  # 2 Mi more tokens packed after the steps
    # memory after warm-up grows by less than a few map batches, never toward the corpus size
    assert out["rss_end_mb"] - out["rss_warm_mb"] < 200
    assert out["maxrss_mb"] < 1024 * out["corpus_gib"] / 2
