"""The OpenAI-compatible HTTP API on Ray Serve, driven by the real ``openai`` client (and raw HTTP
where the bytes on the wire are the point) against the shared serving cluster, on loopback."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import openai
import pytest
import ray
from ray import serve

from raycake import SamplingParams
from raycake.cluster.cluster import Cluster
from raycake.cluster.openai_app import build_openai_app

KEY = "test-key-4c1e"
PROMPT = "def fibonacci(n):"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@dataclass(frozen=True)
class Api:
    host: str
    port: int
    cluster: Cluster

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, prefix: str = "", key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}{prefix}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def api(serving_cluster):
    """The app attached to the shared cluster at /, and a second one that wants a key at /keyed."""
    config = serving_cluster.config
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_openai_app(config), name="test-openai", route_prefix="/")
        keyed = replace(config, http=replace(config.http, api_key=KEY))
        serve.run(build_openai_app(keyed), name="test-openai-keyed", route_prefix="/keyed")
        yield Api("127.0.0.1", port, serving_cluster)
    finally:
        serve.shutdown()


def _post(api: Api, path: str, body: bytes | dict, headers: dict | None = None):
    """(status, headers, body bytes) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        api.base + path,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _get(api: Api, path: str):
    try:
        with urllib.request.urlopen(api.base + path, timeout=60) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _events(raw: bytes) -> list[str]:
    """The data of each Server-Sent Event; the body must be nothing but events."""
    text = raw.decode()
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: ") :] for b in blocks]


def _reference(cluster: Cluster, prompt, **params) -> object:
    """The same request through the Python API."""
    return cluster.generate([prompt], SamplingParams(**params))[0]


def _settled(check, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ray.exceptions.RayError, OSError):
            if check():
                return True
        time.sleep(0.2)
    return False


def _lowest_free_until_restored(decode, initial: int) -> int:
    """Poll the decode instance's free blocks until they are back to ``initial`` (bounded);
    the lowest count seen. A request that ran on to its end would have pushed it far down: its
    blocks grow with every token."""
    seen = []

    def restored() -> bool:
        seen.append(ray.get(decode.free_kv_blocks.remote()))
        return seen[-1] == initial

    assert _settled(restored)
    return min(seen)


# --- the happy paths ---------------------------------------------------------------------------


def test_models_lists_the_served_model_and_its_context(api):
    models = api.client().models.list()
    assert [m.id for m in models.data] == ["default"]
    status, _, body = _get(api, "/v1/models")
    entry = json.loads(body)["data"][0]
    assert status == 200
    assert (entry["object"], entry["owned_by"], entry["max_model_len"]) == (
        "model",
        "raycake",
        2048,
    )


def test_completion_equals_the_python_api_with_usage(api):
    reply = api.client().completions.create(model="default", prompt=PROMPT, max_tokens=12, **GREEDY)
    ref = _reference(api.cluster, PROMPT, temperature=0, max_tokens=12, ignore_eos=True)
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0]
    assert reply.choices[0].text == ref.text
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(api.cluster.tokenizer.encode(PROMPT))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 12)
    assert reply.usage.total_tokens == prompt_tokens + 12


def test_every_prompt_form_gets_its_choices_in_order(api):
    tokenizer = api.cluster.tokenizer
    other = "import os\nimport sys\n"
    texts = {
        p: _reference(api.cluster, p, temperature=0, max_tokens=6, ignore_eos=True).text
        for p in (PROMPT, other)
    }
    ids = {p: tokenizer.encode(p) for p in texts}
    client = api.client()
    for prompt, expected in [
        ([PROMPT, other], [texts[PROMPT], texts[other]]),
        (ids[other], [texts[other]]),
        ([ids[other], ids[PROMPT]], [texts[other], texts[PROMPT]]),
    ]:
        reply = client.completions.create(model="default", prompt=prompt, max_tokens=6, **GREEDY)
        assert [c.text for c in reply.choices] == expected
        assert [c.index for c in reply.choices] == list(range(len(expected)))
        assert reply.usage.completion_tokens == 6 * len(expected)
    assert reply.usage.prompt_tokens == len(ids[other]) + len(ids[PROMPT])


def test_chat_renders_the_models_template(api):
    messages = [
        {"role": "system", "content": "Helpers for the\nbuild."},
        {"role": "user", "content": "def parse_config(path):\n"},
    ]
    rendered = api.cluster.tokenizer.apply_chat_template(messages)
    # The embedded model's template: system lines as comments, then the text as source.
    assert rendered == "# Helpers for the\n# build.\ndef parse_config(path):\n"
    reply = api.client().chat.completions.create(
        model="default", messages=messages, max_completion_tokens=10, **GREEDY
    )
    ref = _reference(api.cluster, rendered, temperature=0, max_tokens=10, ignore_eos=True)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == ref.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(api.cluster.tokenizer.encode(rendered))
    assert reply.usage.completion_tokens == 10


def test_streams_add_up_to_the_full_reply_and_end_with_usage(api):
    client = api.client()
    full = client.completions.create(model="default", prompt=PROMPT, max_tokens=10, **GREEDY)
    chunks = list(
        client.completions.create(
            model="default",
            prompt=PROMPT,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": PROMPT}]
    full_chat = client.chat.completions.create(
        model="default", messages=messages, max_tokens=10, **GREEDY
    )
    chat_chunks = list(
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chat_chunks[:-1])
    assert content == full_chat.choices[0].message.content
    assert chat_chunks[-2].choices[0].finish_reason == "length"
    assert chat_chunks[-1].usage.completion_tokens == 10


def test_the_wire_format_is_server_sent_events_ending_in_done(api):
    status, headers, raw = _post(
        api,
        "/v1/completions",
        {"model": "default", "prompt": PROMPT, "max_tokens": 5, "stream": True, "temperature": 0},
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_n_choices_sample_with_seed_plus_i_and_seeds_reproduce(api):
    client = api.client()
    sample = {"temperature": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    many = client.completions.create(model="default", prompt=PROMPT, n=3, seed=11, **sample)
    singles = [
        client.completions.create(model="default", prompt=PROMPT, seed=11 + i, **sample)
        for i in range(3)
    ]
    again = client.completions.create(model="default", prompt=PROMPT, seed=11, **sample)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert again.choices[0].text == singles[0].choices[0].text
    assert len({c.text for c in many.choices}) > 1  # the seeds differ, so do the samples
    assert many.usage.completion_tokens == 36
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens  # a prompt counts once


def test_stop_strings_end_the_text_before_them(api):
    client = api.client()
    free = client.completions.create(model="default", prompt=PROMPT, max_tokens=24, **GREEDY)
    text = free.choices[0].text
    stop = text[6:9]
    cut = text[: text.index(stop)]
    for stops in (stop, [stop, "\x00never"]):
        reply = client.completions.create(
            model="default", prompt=PROMPT, max_tokens=24, stop=stops, **GREEDY
        )
        assert reply.choices[0].text == cut
        assert reply.choices[0].finish_reason == "stop"


def test_cached_prompt_tokens_are_reported(api):
    prompt = list(range(300, 370))  # 70 token ids no other test sends
    client = api.client()
    first = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0)
    second = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Every full 16-token block but the one holding the last token (its logits are computed).
    assert second.usage.prompt_tokens_details.cached_tokens == 16 * ((70 - 1) // 16) == 64


# --- errors ------------------------------------------------------------------------------------

COMPLETION = {"model": "default", "prompt": PROMPT, "max_tokens": 4}
CHAT = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/completions", b'{"model": "default", "prompt": "x", "temperature": NaN}',
         "temperature", "temperature: expected a finite number, got nan"),
        ("/v1/completions", b'{"model": "default", "prompt": "x", "top_p": Infinity}',
         "top_p", "top_p: expected a finite number"),
        ("/v1/completions", {**COMPLETION, "max_tokens": True}, "max_tokens",
         "max_tokens: expected a valid integer, got True"),
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature",
         "temperature: expected a valid number"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n", "n: expected greater than or equal to 1"),
        ("/v1/completions", {**COMPLETION, "n": 17}, "n", "n: expected less than or equal to 16"),
        ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p", "top_p: expected greater than 0"),
        ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed", "seed: expected None or an"),
        ("/v1/completions", {**COMPLETION, "top_k": 10**9}, "top_k", "top_k: expected an integer in"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, True]}, "prompt",
         "prompt: expected a string, a list of strings, a list of token ids"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 10**6]}, "prompt",
         "token ids in [0, 4096)"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", "prompt: expected at least one"),
        ("/v1/completions", {**COMPLETION, "stop": ""}, "stop", "stop: expected non-empty strings"),
        ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**6]}, "stop_token_ids",
         "token ids in [0, 4096)"),
        ("/v1/completions", {**COMPLETION, "logprobs": 1}, "logprobs",
         "logprobs: expected null (raycake's engine does not return log probabilities), got 1"),
        ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, "presence_penalty",
         "presence_penalty: expected 0"),
        ("/v1/completions", {**COMPLETION, "ttft_slo_s": -1}, "ttft_slo_s",
         "ttft_slo_s: expected greater than 0"),
        ("/v1/completions", {**COMPLETION, "bogus": 1}, "bogus", "bogus: unknown field"),
        ("/v1/completions", {"prompt": "x"}, "model", "model: required"),
        ("/v1/completions", b"{not json", None, "body: expected a JSON object (key must be"),
        ("/v1/completions", b"\xff\xfe", None, "body: expected a JSON object"),
        ("/v1/completions", b"[1, 2]", None, "body: expected a JSON object, got list"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs", "logprobs: expected false"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs",
         "top_logprobs: expected null"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "messages: list should have"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]},
         "messages[0].content", "messages[0].content: expected a string or a list of"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools",
         "tools: expected null or []"),
    ],
)  # fmt: skip
def test_invalid_requests_are_400_naming_the_field(api, path, body, param, message):
    status, _, raw = _post(api, path, body)
    error = json.loads(raw)["error"]
    assert status == 400, error
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(f"{param or 'body'}: "), error["message"]
    assert message in error["message"], error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_bodies_leave_the_server_serving(api):
    for body in (
        b"",
        b"null",
        b'{"model": ' * 50,
        b"\x00" * 1000,
        json.dumps([COMPLETION]).encode(),
    ):
        status, _, raw = _post(api, "/v1/completions", body)
        assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = _post(api, "/v1/completions", {**COMPLETION, "temperature": 0})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 4


def test_prompts_beyond_the_context_are_400_like_vllm(api):
    client = api.client()
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model="default", prompt=[5] * 2048, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as long_total:
        client.completions.create(model="default", prompt=[5] * 2040, max_tokens=16)
    with pytest.raises(openai.BadRequestError) as long_chat:
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x = 1\n" * 700}]
        )
    for caught, param, message in [
        (long_prompt, "prompt", "prompt: expected at most 2047 tokens"),
        (long_total, "max_tokens", "max_tokens: expected at most 8 "),
        (long_chat, "messages", "messages: expected at most 2047 tokens"),
    ]:
        error = caught.value.body
        assert caught.value.status_code == 400
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert error["message"].startswith(message), error["message"]


def test_an_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as caught:
        api.client().completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    status, _, raw = _get(api, "/v2/nowhere")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


def test_the_api_key_is_required_when_set(api):
    for key in ("unused", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as caught:
            api.client("/keyed", key=key).models.list()
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key"
    status, headers, _ = _post(api, "/keyed/v1/completions", COMPLETION)
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    # A request without the key is refused before its body is even read.
    status, _, _ = _post(api, "/keyed/v1/completions", b"{not json")
    assert status == 401
    client = api.client("/keyed", key=KEY)
    assert [m.id for m in client.models.list().data] == ["default"]
    reply = client.completions.create(model="default", prompt=PROMPT, max_tokens=3, **GREEDY)
    assert reply.usage.completion_tokens == 3
    assert _get(api, "/keyed/health")[0] == 200  # health checks need no key


def test_a_conductor_rejection_is_429_with_retry_after(api):
    client = api.client()
    slo = {"ttft_slo_s": 1e-9, "ignore_eos": True}  # no instance can meet a nanosecond TTFT
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="default", prompt=PROMPT, max_tokens=4, extra_body=slo)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "rejected"
    assert "TTFT SLO" in caught.value.body["message"]
    # A stream rejected before its first token gets the status too, not a started stream.
    status, headers, raw = _post(
        api, "/v1/chat/completions", {**CHAT, "stream": True, **slo, "tbt_slo_s": 1e-9}
    )
    assert (status, headers["retry-after"]) == (429, "1")
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"


def test_health_and_prometheus_metrics(api):
    status, _, raw = _get(api, "/health")
    assert status == 200
    assert json.loads(raw) == {
        "status": "ok",
        "prefill": {"prefill-0": True},
        "decode": {"decode-0": True},
    }
    text = ""

    def exported() -> bool:
        nonlocal text
        status, headers, raw = _get(api, "/metrics")
        text = raw.decode()
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return "ray_raycake_ttft_ms_count" in text and "ray_raycake_prompt_tokens" in text

    assert _settled(exported), text  # Ray exports metrics every few seconds
    lines = [line for line in text.splitlines() if line]
    assert all(
        line.split()[2 if line.startswith("#") else 0].startswith("ray_raycake_") for line in lines
    )
    assert text.count("# TYPE ray_raycake_ttft_ms ") == 1


# --- cancellation and faults (the last tests: they restart the decode instance) -------------


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(api):
    decode = api.cluster.decode["decode-0"]
    prefill = api.cluster.prefill["prefill-0"]
    assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 0)
    initial = ray.get(decode.free_kv_blocks.remote())
    body = {"model": "default", "prompt": [7] * 600, "max_tokens": 1000, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    conn = http.client.HTTPConnection(api.host, api.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    events = 0
    while events < 5:
        line = reply.readline()
        events += line.startswith(b"data: ")
    held = ray.get(decode.free_kv_blocks.remote())
    reply.close()
    conn.close()  # the client goes away mid-stream
    assert held <= initial - 600 // 16  # the prompt's blocks, at least, were held
    # Freed long before the request could have generated half of its 1000 tokens.
    assert _lowest_free_until_restored(decode, initial) > initial - (600 + 500) // 16
    assert ray.get(decode.num_unfinished.remote()) == 0
    assert ray.get(prefill.num_unfinished.remote()) == 0


def test_a_client_that_disconnects_before_a_plain_reply_frees_its_blocks(api):
    decode = api.cluster.decode["decode-0"]
    assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 0)
    initial = ray.get(decode.free_kv_blocks.remote())
    body = {"model": "default", "prompt": [9] * 300, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    conn = http.client.HTTPConnection(api.host, api.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 1)  # decoding
    conn.close()  # the client goes away before its reply
    assert _lowest_free_until_restored(decode, initial) > initial - (300 + 750) // 16
    assert ray.get(decode.num_unfinished.remote()) == 0


def test_a_fault_is_500_or_an_error_event_once_streaming_and_health_says_503(api):
    """The decode instance dies while a streamed and a plain request are decoding with random
    sampling (not replayable once tokens went out): the stream ends with an error event and
    [DONE], the plain request gets a 500; /health is 503 until Ray has restarted the instance."""
    import concurrent.futures

    decode = api.cluster.decode["decode-0"]
    sample = {"model": "default", "prompt": PROMPT, "max_tokens": 1000, "temperature": 1.0,
              "ignore_eos": True}  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(_post, api, "/v1/completions", sample)
        assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 1)
        conn = http.client.HTTPConnection(api.host, api.port, timeout=120)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({**sample, "stream": True}),
            {"Content-Type": "application/json"},
        )
        reply = conn.getresponse()
        assert reply.status == 200
        assert _settled(lambda: ray.get(decode.num_unfinished.remote()) == 2)
        events = []
        while len(events) < 5:  # both requests are in one batch, both have sent tokens
            line = reply.readline()
            if line.startswith(b"data: "):
                events.append(line[len(b"data: ") :].strip())
        ray.kill(decode, no_restart=False)
        rest = reply.read()
        conn.close()
        status, _, raw = plain.result(timeout=120)
    tail = _events(rest.lstrip(b"\n"))  # the reading above stopped before a separator
    assert tail[-1] == "[DONE]"
    error = json.loads(tail[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal")
    assert "cannot be replayed" in error["message"]
    assert all("error" not in json.loads(e) for e in [*events, *tail[:-2]])
    assert status == 500, raw
    assert json.loads(raw)["error"]["code"] == "internal"
    assert _settled(lambda: _get(api, "/health")[0] == 503)
    assert _settled(lambda: _get(api, "/health")[0] == 200, timeout_s=120)
    status, _, raw = _post(api, "/v1/completions", {**COMPLETION, "temperature": 0})
    assert status == 200  # serving again after the restart
