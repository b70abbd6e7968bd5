"""The continuous-batching engine and its HTTP server with a tiny random Llama (loopback only).

One engine (8 slots, two batch buckets, two prompt buckets, one span) is warmed up once for the
module; the official ``openai`` client checks streaming, seeded sampling inside a batch,
disconnects, compile-free request mixes and malformed requests.
"""
import concurrent.futures as cf
import json
import re
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lmx.backends import LocalBackend  # noqa: E402
from lmx.serve import ChatServer, GenRequest, backend_compiles  # noqa: E402

MODEL = "tiny-random"
# one shared warm-up compiles 4 kernel variants: ~35 s on a loaded 2-core VM
# one worker builds the module's warmed-up engine and server, not both
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_engine_server")]


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.models import ModelConfig, Transformer

    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=256), rngs=nnx.Rngs(0))
    backend = LocalBackend.from_lmx(model, tok, model_name=MODEL, max_batch=8, max_seq_len=256,
                                    batch_buckets=(2, 8), span_buckets=(256,),
                                    prompt_buckets=(64, 256))
    return model, tok, backend


@pytest.fixture(scope="module")
def server(tiny):
    with ChatServer(tiny[2], model_name=MODEL, warmup=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)


def _msgs(text):
    return [{"role": "user", "content": text}]


def _metrics(server) -> dict:
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_engine_greedy_matches_generate(tiny, server):
    """Slot prefill + decode steps reproduce lmx.models.generate (greedy) token for token."""
    from lmx.models import generate

    model, tok, backend = tiny
    prompts = [list(tok.encode("hello " * k, add_special_tokens=False)) for k in (1, 4, 9)]
    ref = generate(model, prompts, max_new_tokens=12)
    outs = backend.engine.generate([GenRequest(p, max_tokens=12, ignore_eos=True) for p in prompts])
    assert [o[0] for o in outs] == [tok.decode(r) for r in ref]
    assert all(o[2].finish_reason == "length" and o[2].completion_tokens == 12 for o in outs)


def test_stream_equals_non_stream_at_temperature_0(client):
    kw = dict(model=MODEL, messages=_msgs("Stream me something."), max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(text) > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the legacy completions route streams the same way
    ckw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    c_full = client.completions.create(**ckw).choices[0].text
    c_stream = "".join(c.choices[0].text for c in client.completions.create(stream=True, **ckw))
    assert c_stream == c_full


def test_seeded_sampling_same_alone_and_in_a_batch_of_8(client):
    req = dict(model=MODEL, messages=_msgs("Tell me a story."), max_tokens=32, temperature=0.9,
               top_p=0.95, seed=2 ** 64 - 1)
    alone = client.chat.completions.create(**req).choices[0].message.content
    others = [dict(model=MODEL, messages=_msgs("x" * (5 * i + 1)), max_tokens=8 + 5 * i,
                   temperature=[0, 0.5, 1.3][i % 3], top_p=[1.0, 0.8][i % 2], seed=i)
              for i in range(7)]
    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        futs = [ex.submit(client.chat.completions.create, **r) for r in others[:3] + [req] + others[3:]]
        outs = [f.result().choices[0].message.content for f in futs]
    assert outs[3] == alone and len(alone) > 0
    # a different seed gives different text: the seed is really used
    other_seed = client.chat.completions.create(**{**req, "seed": 7}).choices[0].message.content
    assert other_seed != alone
    # n = 2 choices sample different streams of the same seed, and each is reproducible
    two = client.chat.completions.create(n=2, **req)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == alone
    assert two.choices[1].message.content != alone


def test_client_disconnect_frees_its_slot(server, client):
    before = _metrics(server)
    body = {"model": MODEL, "messages": _msgs("go on forever"), "max_tokens": 220, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.base_url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) >= 2:
                    break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["lmx_running_slots"] == 0:
            break
        time.sleep(0.05)
    key = 'lmx_requests_finished_total{finish_reason="cancelled"}'
    assert m["lmx_running_slots"] == 0 and m[key] == before[key] + 1
    assert m["lmx_generation_tokens_total"] - before["lmx_generation_tokens_total"] < 220
    out = client.chat.completions.create(model=MODEL, messages=_msgs("still there?"), max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_dropped_non_streaming_request_is_cancelled(server):
    import socket

    key = 'lmx_requests_finished_total{finish_reason="cancelled"}'
    before = _metrics(server)[key]
    body = json.dumps({"model": MODEL, "messages": _msgs("long"), "max_tokens": 220,
                       "ignore_eos": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metrics(server)[key] == before:
        time.sleep(0.05)
    m = _metrics(server)
    assert m[key] == before + 1 and m["lmx_running_slots"] == 0


def test_no_compile_after_warmup_across_50_mixed_requests(server, client):
    rng = np.random.default_rng(0)
    engine = server.engine
    compiled, xla = engine.compile_count(), backend_compiles()

    def one(i):
        kw = dict(model=MODEL, messages=_msgs("abc " * int(rng.integers(0, 50))),
                  max_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0, 0.3, 0.7, 1.0, 1.6])),
                  top_p=float(rng.choice([1.0, 0.9, 0.4])), seed=int(rng.integers(0, 2 ** 63)))
        if i % 5 == 0:
            kw.update(logprobs=True, top_logprobs=int(i % 4))
        if i % 7 == 0:
            kw["stop"] = ["a", "zz"]
        if i % 3 == 0:
            kw["extra_body"] = {"top_k": int(rng.integers(1, 50))}
        if i % 4 == 0:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kw))
        return client.chat.completions.create(**kw).choices[0].message.content

    with cf.ThreadPoolExecutor(max_workers=10) as ex:
        outs = list(ex.map(one, range(50)))
    assert len(outs) == 50 and all(isinstance(o, str) for o in outs)
    assert engine.compile_count() == compiled  # no new kernel variant
    assert backend_compiles() == xla  # and no XLA compile at all in the process
    # the counter is live: a program never seen before is counted
    import jax

    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    assert backend_compiles() > xla


def test_logprobs_stop_strings_roles(client, tiny):
    _, tok, backend = tiny
    out = client.chat.completions.create(model=MODEL, messages=_msgs("hi"), max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 3 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    full = backend.complete([_msgs("stop test")], max_tokens=30)[0].text
    stop = full[5:7]
    cut = client.chat.completions.create(model=MODEL, messages=_msgs("stop test"), max_tokens=30,
                                         temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.find(stop)] and cut.finish_reason == "stop"
    # developer / tool roles and assistant content null are accepted
    msgs = [{"role": "developer", "content": "be nice"}, {"role": "user", "content": "call it"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    ok = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list().data] == [MODEL]


MALFORMED = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("POST", "/v1/chat/completions", {"messages": _msgs("x")}, 400),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": _msgs("x")}, 404),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "seed": 2 ** 64}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "seed": 1.5}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "n": 0}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "best_guess": 1}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "max_tokens": 10 ** 6}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"), "top_logprobs": 2}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": _msgs("x"),
                                      "stream_options": {"include_usage": True}}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, 400),
    ("DELETE", "/v1/chat/completions", None, 405),
    ("GET", "/v1/nothing/here", None, 404),
]


def test_20_malformed_requests_get_4xx_json_and_server_stays_up(server, client):
    assert len(MALFORMED) == 20
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
        for method, path, body, status in MALFORMED:
            content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
            r = c.request(method, path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (method, path, body, r.text)
            err = r.json()["error"]
            assert isinstance(err["message"], str) and len(err["message"]) > 5 and "type" in err
        assert c.get("/health").json()["status"] == "ok"
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.chat.completions.create(model=MODEL, messages=_msgs("x"), seed=2 ** 64)
    ok = client.chat.completions.create(model=MODEL, messages=_msgs("still up"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_sample_rows_filters():
    """Per-row sampling: top_k=1 and a tiny top_p reduce to greedy; temperature 0 rows are greedy."""
    import jax.numpy as jnp

    from lmx.models.slot_decode import sample_rows, seed_to_key

    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    keys = jnp.asarray(np.stack([seed_to_key(s) for s in (0, 1, 2 ** 64 - 1, -5)]))
    z = jnp.zeros(4, jnp.int32)
    got = sample_rows(logits, jnp.asarray([0.0, 1.0, 1.0, 2.0]), jnp.asarray([0, 1, 0, 0], jnp.int32),
                      jnp.asarray([1.0, 1.0, 1e-6, 1.0]), keys, z, z)
    assert np.asarray(got)[:3].tolist() == greedy[:3].tolist()
    with pytest.raises(ValueError, match="seed must be in"):
        seed_to_key(2 ** 64)
