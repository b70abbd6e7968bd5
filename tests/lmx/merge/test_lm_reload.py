import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lmx.merge as LM

models = pytest.importorskip("lmx.models")


def test_merged_safetensors_reload_into_lm_core(tmp_path):
    cfg = dataclasses.replace(models.ModelConfig.tiny_llama(vocab_size=64), n_layers=2)
    paths = []
    for seed in range(3):
        paths.append(models.save_hf(models.Transformer(cfg, rngs=nnx.Rngs(seed)), tmp_path / f"m{seed}"))
    summary = LM.stream_merge(LM.Ties(k=0.2, lam=0.3), paths[0], paths[1:], tmp_path / "merged",
                              progress=False)
    assert (tmp_path / "merged" / "config.json").exists() and summary["n_tensors"] > 0
    merged = models.load_hf(tmp_path / "merged")
    on_disk = LM.load_safetensors(tmp_path / "merged")
    reloaded = models.hf_state_dict(merged)
    assert set(reloaded) == set(on_disk)
    for name, x in on_disk.items():
        np.testing.assert_array_equal(reloaded[name], x.astype(np.float32), err_msg=name)
    base = LM.load_safetensors(paths[0])
    assert any(not np.array_equal(base[n], on_disk[n]) for n in base)
    tokens = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    logits = merged(tokens, attention_mask=jnp.ones_like(tokens, dtype=bool))
    assert logits.shape == (1, 4, 64) and bool(jnp.all(jnp.isfinite(logits)))
