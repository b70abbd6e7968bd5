"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (scripted token model behind the
function engine: no JAX compile)."""
import concurrent.futures as cf
import http.client
import json
import threading

import numpy as np
import pytest

from lmx.backends import BackendError, LocalBackend, OpenAIBackend
from lmx.backends.testing import ScriptedTokenModel, byte_chat_tokenizer
from lmx.serve import ChatServer


def _reply(msgs):
    last = msgs[-1]["content"]
    return f"echo[{len(msgs)}]: {last}"


@pytest.fixture(scope="module")
def server():
    tok = byte_chat_tokenizer()
    tm = ScriptedTokenModel(tok, _reply)
    backend = LocalBackend(tok, tm.generate_fn, tm.logprobs_fn, max_seq_len=300, model_name="toy")
    with ChatServer(backend, max_batch=8) as srv:
        srv.token_model = tm
        yield srv


def _raw(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def _post(srv, payload):
    return _raw(srv, "POST", "/v1/chat/completions", json.dumps(payload).encode(),
                {"Content-Type": "application/json"})


def test_models_and_chat_roundtrip(server):
    client = OpenAIBackend(server.base_url, "toy", timeout=10)
    assert client.models() == ["toy"]
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ünïcode ok?"}]]
    assert client.chat(convs, max_tokens=64) == ["echo[1]: hello", "echo[2]: ünïcode ok?"]
    out = client.complete(convs[:1], max_tokens=4)[0]
    assert (out.text, out.finish_reason, out.completion_tokens) == ("echo", "length", 4)
    status, body = _post(server, {"model": "toy", "messages": convs[0], "stop": ["]"]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "echo[1"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


@pytest.mark.parametrize("payload, status, param, code", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ({"model": "toy"}, 400, "messages", None),
    ({"model": "toy", "messages": []}, 400, "messages", None),
    ({"model": "toy", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     400, "response_format", "unsupported_parameter"),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1}}, 400, "logit_bias",
     "unsupported_parameter"),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "seed": 2 ** 64}, 400, "seed", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs", None),
    ({"model": "toy", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages", "context_length_exceeded"),
    ({"model": "toy", "messages": [{"role": "user", "content": "x"}], "max_tokens": 290}, 400, "messages", "context_length_exceeded"),
    ({"model": "toy", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages", None),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, payload, status, param, code):
    got, body = _post(server, payload)
    assert got == status
    err = body["error"]
    assert err["param"] == param and err["code"] == code and len(err["message"]) > 10
    ok, body = _post(server, {"model": "toy", "messages": [{"role": "user", "content": "still up"}]})
    assert ok == 200 and body["choices"][0]["message"]["content"] == "echo[1]: still up"


def test_malformed_json_wrong_route_and_method(server):
    status, body = _raw(server, "POST", "/v1/chat/completions", b"{not json",
                        {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    assert _raw(server, "GET", "/v1/nothing")[0] == 404
    assert _raw(server, "GET", "/v1/chat/completions")[0] == 405
    status, _ = _raw(server, "POST", "/v1/chat/completions", b"x" * 10,
                     {"Content-Length": str(1 << 21)})
    assert status == 413
    client = OpenAIBackend(server.base_url, "nope", timeout=10, max_retries=2)
    with pytest.raises(BackendError, match="404.*does not exist") as ei:
        client.chat([[{"role": "user", "content": "x"}]])
    assert ei.value.status == 404


def test_concurrent_requests_all_answered_and_batched(server):
    n = 24
    before = len(server.engine.batches)

    def one(i):
        return _post(server, {"model": "toy", "max_tokens": 40, "temperature": 0,
                              "messages": [{"role": "user", "content": f"q{i}"}]})

    with cf.ThreadPoolExecutor(max_workers=12) as ex:
        results = list(ex.map(one, range(n)))
    assert [r[0] for r in results] == [200] * n
    assert [r[1]["choices"][0]["message"]["content"] for r in results] == [f"echo[1]: q{i}" for i in range(n)]
    sizes = server.engine.batches[before:]
    assert sum(sizes) == n and max(sizes) > 1  # concurrent clients shared generate calls


def test_logprobs_and_label_probs_over_http(server):
    status, body = _post(server, {"model": "toy", "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                                  "messages": [{"role": "user", "content": "A"}]})
    assert status == 200
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["e", "c", "h"] and len(content[0]["top_logprobs"]) == 2
    # the scripted model puts +3 nats on the reply's first token ("e")
    assert content[0]["top_logprobs"][0]["token"] == "e"
    client = OpenAIBackend(server.base_url, "toy", timeout=10)
    p = client.label_probs([[{"role": "user", "content": "x"}]], ["e", "z"])
    # "z" is not among the 20 most likely tokens: the HTTP path can only give it 0 (documented)
    np.testing.assert_allclose(p, [[1.0, 0.0]])
    local = server.backend.label_probs([[{"role": "user", "content": "x"}]], ["e", "z"])
    np.testing.assert_allclose(local[0], [np.exp(3) / (np.exp(3) + 1), 1 / (np.exp(3) + 1)], rtol=1e-5)


def test_client_retries_then_succeeds_and_times_out():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(1)
            if len(hits) < 3:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            data = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        assert OpenAIBackend(url, "m", max_retries=3, backoff=0.01).chat(
            [[{"role": "user", "content": "x"}]]) == ["ok"]
        assert len(hits) == 3
        hits.clear()
        with pytest.raises(BackendError, match="503.*gave up after 2 attempts"):
            OpenAIBackend(url, "m", max_retries=1, backoff=0.01).chat([[{"role": "user", "content": "x"}]])
    finally:
        httpd.shutdown()
        httpd.server_close()
    # a port nobody listens on: connection refused is retried, then reported
    with pytest.raises(BackendError, match="failed"):
        OpenAIBackend(url, "m", max_retries=1, backoff=0.01, timeout=2).chat([[{"role": "user", "content": "x"}]])
