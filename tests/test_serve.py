"""The OpenAI-compatible server, end to end on a live loopback uvicorn with tiny-llama."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from frugal_rlhf.models.loading import load_model  # noqa: E402
from frugal_rlhf.serve.command import make_app, run_in_thread  # noqa: E402
from frugal_rlhf.serve.tokens import IncrementalDecoder, StopMatcher  # noqa: E402

TIMEOUT = 30.0
USER = [{"role": "user", "content": "Hello there"}]


POISON = "\x01"  # in a prompt, makes the test model's scores for that row NaN


class PrintableOnly(nn.Module):
    """tiny-llama restricted to printable ASCII bytes (and never EOS).

    A random byte-level model emits invalid UTF-8 and special tokens, whose text cannot be
    re-tokenized to count tokens; restricted, every token is one character, and every
    answer runs to max_tokens, so lengths in the tests are exact. A prompt containing
    POISON gets NaN scores in its row only: a numeric failure no validation can catch.
    """

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.config = model, model.config
        allowed = [i for i in range(len(tokenizer)) if len(s := tokenizer.decode([i])) == 1 and 32 <= ord(s) < 127]
        bias = torch.full((len(tokenizer),), float("-inf"))
        bias[allowed] = 0.0
        self.register_buffer("bias", bias)
        self.poison = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(POISON))[0]
        self.step_delay = 0.0  # seconds per forward: a test that must act while a stream runs sets it

    def forward(self, input_ids, **kwargs):
        if self.step_delay:
            time.sleep(self.step_delay)
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits + self.bias
        poisoned = (input_ids == self.poison).any(dim=-1)
        logits = logits.masked_fill(poisoned[:, None, None], float("nan"))
        return SimpleNamespace(logits=logits, cache=out.cache)


def _serve(api_key=None, max_batch=8, max_queue=64, printable=True, model=None, tokenizer=None, **options):
    if model is None:
        model, tokenizer = load_model("tiny-llama")
    model = PrintableOnly(model, tokenizer).eval() if printable else model.eval()
    # One torch thread: a 1M-parameter model gains nothing from two, and on a busy 2-core
    # machine two OpenMP threads waiting on each other make each step many times slower.
    options.setdefault("threads", 1)
    app = make_app(model, tokenizer, "tiny-llama", api_key, max_batch, max_queue, **options)
    live = run_in_thread(app)
    live.model = model
    return live, tokenizer


@pytest.fixture(scope="module")
def server():
    live, tokenizer = _serve()
    live.tokenizer = tokenizer
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[dev]')")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _events(response) -> list:
    """Parse an SSE body into JSON objects, with the literal "[DONE]" kept as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _wait_idle(http, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = http.get("/health").json()
        if (stats["active"], stats["queued"]) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


# --- text helpers -------------------------------------------------------------------


def test_incremental_decoder_never_splits_characters():
    _, tokenizer = load_model("tiny-llama")
    text = "héllo wörld: 世界 🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # byte-level: multi-byte characters span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_partial_stop_strings():
    stopper = StopMatcher(("STOP", "xy"))
    assert stopper.push("abc S") == "abc "  # "S" may start "STOP"
    assert stopper.push("T") == ""
    assert stopper.push("x") == "ST"  # "STx" cannot become "STOP", but "x" may start "xy"
    assert stopper.held == "x"
    assert stopper.push("z") == "xz"
    assert stopper.push("1 ST") == "1 "
    assert stopper.push("OP and more") == ""
    assert stopper.stopped and stopper.flush() == ""
    free = StopMatcher(("END",))
    assert free.push("the EN") == "the " and free.flush() == "EN"  # ended without a stop: released


# --- the OpenAI client --------------------------------------------------------------


def test_chat_completion_with_openai_client(oai, server):
    out = oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=12, seed=1)
    text = out.choices[0].message.content
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == 12 == _n_tokens(server.tokenizer, text)
    prompt = server.tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert usage.prompt_tokens == _n_tokens(server.tokenizer, prompt)


def test_streaming_chat_with_openai_client(oai, server):
    stream = oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=20, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage = chunks[-1].usage  # the final chunk: no choices, only usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == 20 == _n_tokens(server.tokenizer, text)


def test_completions_and_models(oai, server):
    out = oai.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=7, seed=3)
    assert out.object == "text_completion" and _n_tokens(server.tokenizer, out.choices[0].text) == 7
    assert out.usage.prompt_tokens == _n_tokens(server.tokenizer, "Once upon a time")
    streamed = list(oai.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=7, seed=3,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text  # same seed, same text
    assert streamed[-1].choices[0].finish_reason == "length"
    assert [m.id for m in oai.models.list().data] == ["tiny-llama"]


def test_seed_makes_a_request_reproducible(http):
    def ask(seed):
        body = {"messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": seed}
        return http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_stop_strings_cut_the_output(http):
    body = {"messages": USER, "max_tokens": 200, "seed": 5}
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    stops = ["a", "e", "o", "Q"]
    cut = min(i for i in (full.find(s) for s in stops) if i >= 0)  # 4 of 95 characters: one appears
    out = http.post("/v1/chat/completions", json={**body, "stop": stops}).json()
    assert out["choices"][0]["message"]["content"] == full[:cut]
    assert out["choices"][0]["finish_reason"] == "stop"
    with http.stream("POST", "/v1/chat/completions", json={**body, "stop": stops, "stream": True}) as r:
        events = _events(r)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == full[:cut] and events[-2]["choices"][0]["finish_reason"] == "stop"


# --- concurrency --------------------------------------------------------------------


def _check_stream(events, max_tokens, tokenizer):
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    middle, last = chunks[1:-1], chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None and "content" in c["choices"][0]["delta"] for c in middle)
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert _n_tokens(tokenizer, text) == max_tokens


def test_32_concurrent_streams_complete_and_are_batched(server, http):
    before = http.get("/health").json()
    results, errors = [None] * 32, []

    def client(i):
        body = {"messages": [{"role": "user", "content": f"question {i}" * (1 + i % 3)}], "max_tokens": 8 + i % 5,
                "stream": True}
        try:
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    results[i] = (_events(r), body["max_tokens"])
        except Exception as err:  # reported below: a thread's assert would be lost
            errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT)
    assert not errors and all(r is not None for r in results)
    for events, max_tokens in results:
        _check_stream(events, max_tokens, server.tokenizer)
    after = _wait_idle(http)
    assert (after["active"], after["queued"]) == (0, 0)
    assert after["largest_batch"] > 1  # requests really shared batches
    assert after["batches"] - before["batches"] < 32


def test_mid_stream_disconnect_frees_the_slot(server, http):
    before = http.get("/health").json()
    body = {"messages": USER, "max_tokens": 900, "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks arrived: it is generating
            assert any('"content"' in line for line in got)
    # The client is gone (connection closed): the row must be dropped, not run to 900 tokens.
    after = _wait_idle(http)
    assert (after["active"], after["queued"]) == (0, 0)
    assert after["cancelled"] == before["cancelled"] + 1
    ok = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_full_queue_answers_503():
    live, _ = _serve(max_batch=1, max_queue=1)
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            long = {"messages": USER, "max_tokens": 900, "stream": True}
            with c.stream("POST", "/v1/chat/completions", json=long) as running:  # occupies the batch
                # Keep the iterator referenced: a discarded, garbage-collected line iterator
                # closes the connection, which the server rightly treats as a disconnect.
                running_lines = running.iter_lines()
                next(running_lines)
                with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c2:
                    with c2.stream("POST", "/v1/chat/completions", json=long) as waiting:  # fills the queue
                        assert waiting.status_code == 200, c.get("/health").json()
                        full = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
                        assert full.status_code == 503
                        assert full.json()["error"]["type"] == "server_error"
                        assert full.headers["retry-after"] == "1"
            assert _wait_idle(c)["active"] == 0
            assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
    finally:
        live.stop()


# --- bad input and auth -------------------------------------------------------------

LONG = "x" * 1100  # byte-level: more tokens than the 1024-position context
BAD = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": USER, "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", ""]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "n": 17}, "n"),
    # Each of these made the sampler fail (500 for the whole batch) or was silently ignored.
    ("/v1/chat/completions", {"messages": USER, "seed": 2 ** 64}, "seed"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", b"[" * 5000, None),
    ("/v1/chat/completions", {"messages": USER, "stop": "x" * 257}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 1010}, "max_tokens"),  # prompt + 1010 > 1024
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 1010}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"65": 100}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_400_in_openai_shape(http, path, body, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert http.get("/health").json()["status"] == "ok"


def test_oversized_body_gets_413(http):
    r = http.post("/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert http.get("/health").json()["status"] == "ok"


def test_unknown_route_and_method_are_openai_errors(http):
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key():
    live, _ = _serve(api_key="s3cret")
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            body = {"messages": USER, "max_tokens": 2}
            missing = c.post("/v1/chat/completions", json=body)
            wrong = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            right = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
            assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
            assert wrong.json()["error"]["code"] == "invalid_api_key" and "error" in missing.json()
            assert missing.headers["www-authenticate"] == wrong.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/models").status_code == 401
            assert c.get("/health").status_code == 200  # probes need no key
    finally:
        live.stop()


# --- the chat page in headless Chromium ---------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def _chat_page(url: str):
    """The chat page of the server at `url` in headless Chromium, once it listed the models."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright; no browser download)")
    if not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else route.abort())  # loopback only: the page must need nothing else
            page.goto(url + "/", timeout=15_000)
            page.wait_for_selector("#model:text('tiny-llama')", timeout=10_000)
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def test_chat_page_streams_an_answer(server, tmp_path):
    cancelled_before = httpx.get(server.url + "/health", timeout=TIMEOUT).json()["cancelled"]
    with _chat_page(server.url) as page:
        page.click("details.settings summary")  # open the settings panel
        page.fill("#max-tokens", "40")
        page.fill("#input", "Hi! Who are you?")
        page.press("#input", "Enter")
        answer = page.locator(".msg.assistant[data-done='true']")
        answer.wait_for(timeout=20_000)
        text = answer.inner_text()
        assert page.locator(".msg.user").inner_text() == "Hi! Who are you?"
        assert len(text.strip()) > 0 and page.locator(".msg.error").count() == 0
        # A second turn sends the history: two user and two assistant bubbles.
        page.fill("#input", "And then?")
        page.press("#input", "Enter")
        page.locator(".msg.assistant[data-done='true']").nth(1).wait_for(timeout=20_000)
        assert page.locator(".msg.user").count() == 2
        # A long answer shows up while it streams, and Stop aborts it. Each decode step is
        # slowed so the 600 tokens outlast the click however fast or busy the machine is
        # (unslowed, the 1M-parameter model could finish before Stop is pressed).
        page.fill("#max-tokens", "600")  # prompt + max_tokens must fit the 1024 context
        page.fill("#input", "Tell me a long story.")
        server.model.step_delay = 0.05
        try:
            page.press("#input", "Enter")
            page.wait_for_function("() => { const m = document.querySelector('.msg.assistant.streaming');"
                                   " return m && m.textContent.length > 0; }")
            page.click("#stop")
        finally:
            server.model.step_delay = 0.0
        note = page.locator(".msg.assistant").nth(2).locator(".note")
        note.wait_for()
        assert note.inner_text() == "(stopped)"
        page.screenshot(path=str(tmp_path / "chat.png"))
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        after = _wait_idle(http)
    assert after["active"] == 0 and after["cancelled"] == cancelled_before + 1  # Stop freed the slot
    assert (tmp_path / "chat.png").stat().st_size > 0


# --- issue 22: one request cannot hurt another -----------------------------------------


def _concurrently(server, bodies, path="/v1/chat/completions"):
    """POST every body at once (a barrier lines them up, so they share batches) -> responses."""
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            barrier.wait()
            results[i] = c.post(path, json=bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT)
    return results


def test_poison_requests_do_not_fail_the_requests_batched_with_them(server, http):
    good = [{"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 30, "seed": i}
            for i in range(6)]
    poison = [{"messages": USER, "max_tokens": 30, "seed": 2 ** 64},  # torch cannot take it
              {"messages": USER, "max_tokens": 30, "temperature": 1e-38},  # logits / T overflow: now greedy
              {"messages": [{"role": "user", "content": POISON}], "max_tokens": 30}]  # NaN scores in its row
    responses = _concurrently(server, good + poison)
    for r in responses[:6]:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 30
    assert responses[6].status_code == 400 and responses[6].json()["error"]["param"] == "seed"
    assert responses[7].status_code == 200
    tiny = responses[7].json()["choices"][0]["message"]["content"]
    greedy = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 30, "temperature": 0})
    assert tiny == greedy.json()["choices"][0]["message"]["content"]
    assert responses[8].status_code == 500 and "not finite" in responses[8].json()["error"]["message"]
    assert _wait_idle(http)["active"] == 0


def test_a_streaming_row_with_nan_scores_fails_alone(server, http):
    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": 20, "stream": True}
              for text in ("fine", POISON, "also fine")]
    results = [None] * 3
    barrier = threading.Barrier(3)

    def client(i):
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            barrier.wait()
            with c.stream("POST", "/v1/chat/completions", json=bodies[i]) as r:
                results[i] = _events(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT)
    _check_stream(results[0], 20, server.tokenizer)
    _check_stream(results[2], 20, server.tokenizer)
    assert "not finite" in results[1][-2]["error"]["message"] and results[1][-1] == "[DONE]"


def test_non_streaming_disconnect_is_noticed_while_tokens_flow(server, http):
    before = http.get("/health").json()["cancelled"]
    body = {"messages": USER, "max_tokens": 900}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
    after = _wait_idle(http)
    # Dropped by the worker (counted as cancelled), not run to its 900 tokens for nobody.
    assert (after["active"], after["cancelled"]) == (0, before + 1)


def _spy_on_tokenizer(tokenizer) -> list:
    """Record (thread name, text length) of every call that tokenizes text."""
    calls = []
    original = type(tokenizer).__call__

    def spying(self, text, *args, **kwargs):
        calls.append((threading.current_thread().name, len(text)))
        return original(self, text, *args, **kwargs)

    tokenizer.__class__ = type("Spy" + type(tokenizer).__name__, (type(tokenizer),), {"__call__": spying})
    return calls


def test_tokenizing_runs_off_the_event_loop_and_huge_prompts_are_refused_unread():
    model, tokenizer = load_model("tiny-llama")
    calls = _spy_on_tokenizer(tokenizer)
    live, _ = _serve(model=model, tokenizer=tokenizer)
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            ok = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            assert ok.status_code == 200 and calls
            huge = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * (3 << 20)}]})
            assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded"
            huge = c.post("/v1/completions", json={"prompt": "y" * (3 << 20)})
            assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"
    finally:
        live.stop()
    assert max(n for _, n in calls) < 1 << 20  # the 3 MiB prompts were never tokenized
    # The event loop runs in run_in_thread's "frugal-serve-http" thread: tokenizing elsewhere.
    assert all(name != "frugal-serve-http" for name, _ in calls), calls


def test_max_tokens_must_fit_the_context_after_the_prompt(http):
    r = http.post("/v1/completions", json={"prompt": "x" * 1000, "max_tokens": 30})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    fits = http.post("/v1/completions", json={"prompt": "x" * 1000})  # no max_tokens: what fits
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 24


# --- issue 22: the OpenAI options people use --------------------------------------------


def test_n_choices(oai, server):
    out = oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=8, n=3, seed=4)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert all(_n_tokens(server.tokenizer, t) == 8 for t in texts) and len(set(texts)) == 3
    assert out.usage.completion_tokens == 24
    stream = list(oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=8, n=3, seed=4,
                                              stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in stream if c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert sorted(c.choices[0].index for c in stream if c.choices[0].finish_reason) == [0, 1, 2]


def test_chat_logprobs(oai, server):
    out = oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=6, temperature=0,
                                      logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == out.choices[0].message.content and len(entries) == 6
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and sum(map(math.exp, tops)) <= 1 + 1e-6
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(tops[0])  # greedy: the top one
        assert bytes(e.bytes).decode() == e.token
    stream = list(oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=6, temperature=0,
                                              logprobs=True, stream=True))
    streamed = [e for c in stream if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_completion_logprobs_and_echo(oai):
    out = oai.completions.create(model="tiny-llama", prompt="Once", max_tokens=5, logprobs=2, seed=1)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset == list(range(5))
    echoed = oai.completions.create(model="tiny-llama", prompt="Once", max_tokens=5, echo=True, seed=1)
    assert echoed.choices[0].text == "Once" + out.choices[0].text


def test_presence_penalty_changes_what_is_picked(http):
    def greedy(**penalty):
        body = {"messages": USER, "max_tokens": 40, "temperature": 0, **penalty}
        return http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    plain = greedy()
    assert len(set(plain)) < 40  # a random model's greedy text repeats itself
    # A penalty of 2 outweighs the random model's logit differences: no character twice.
    assert len(set(greedy(presence_penalty=2))) == 40
    assert len(set(greedy(frequency_penalty=2))) == 40
    assert greedy(presence_penalty=-2) != greedy(presence_penalty=2)


def test_models_retrieve(oai, http):
    assert oai.models.retrieve("tiny-llama").id == "tiny-llama"
    r = http.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/chat/completions", json={"messages": USER, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# --- issue 22: browser-safe defaults ---------------------------------------------------


def test_posts_must_be_json(http):
    body = json.dumps({"messages": USER, "max_tokens": 2})
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_header_must_name_this_server(server, http):
    body = {"messages": USER, "max_tokens": 2}
    evil = http.post("/v1/chat/completions", json=body, headers={"Host": f"rebind.example:{server.port}"})
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"
    assert http.get("/", headers={"Host": "rebind.example"}).status_code == 400
    local = http.post("/v1/chat/completions", json=body, headers={"Host": f"localhost:{server.port}"})
    assert local.status_code == 200


def test_cors_is_off_unless_origins_are_named(server, http):
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = http.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    live, _ = _serve(cors_origins=("http://page.example",), allow_hosts=("api.example",))
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            r = c.options("/v1/chat/completions", headers=preflight)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://page.example"
            other = c.options("/v1/chat/completions", headers={**preflight, "Origin": "http://other.example"})
            assert "access-control-allow-origin" not in other.headers
            assert c.get("/health", headers={"Host": "api.example"}).status_code == 200  # --allow-host
    finally:
        live.stop()


def test_api_key_from_environment_or_file(tmp_path, monkeypatch):
    from frugal_rlhf.serve.command import add_serve_args, resolve_api_key

    parser = add_serve_args(argparse.ArgumentParser())
    monkeypatch.delenv("FRUGAL_API_KEY", raising=False)
    assert resolve_api_key(parser.parse_args(["tiny-llama"])) is None
    monkeypatch.setenv("FRUGAL_API_KEY", "from-env")
    assert resolve_api_key(parser.parse_args(["tiny-llama"])) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key(parser.parse_args(["tiny-llama", "--api-key-file", str(tmp_path / "key")])) == "from-file"


def test_default_thread_count_leaves_a_core_free(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    live, _ = _serve(threads=None)
    try:
        assert httpx.get(live.url + "/health", timeout=TIMEOUT).json()["threads"] == 1
    finally:
        live.stop()


# --- issue 22: every trained policy from one base --------------------------------------


def _random_adapter(path, seed: int) -> None:
    """A LoRA adapter for tiny-llama whose B is not zero, so it changes the answers."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model("tiny-llama")
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(path)


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory):
    """tiny-llama served with two random LoRA adapters, "ppo" and "dpo"; .sizes = (base, lora)."""
    pytest.importorskip("peft")
    from frugal_rlhf.serve.command import attach_adapters, parse_adapters

    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("ppo", "dpo")):
        _random_adapter(root / name, seed=i)
    adapters = parse_adapters([f"{name}={root / name}" for name in ("ppo", "dpo")])
    base, tokenizer = load_model("tiny-llama")
    base_size = sum(p.numel() for p in base.parameters())
    model = attach_adapters(base, adapters)
    lora_size = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    live, _ = _serve(model=model, tokenizer=tokenizer, adapters=tuple(adapters))
    live.sizes = (base_size, lora_size, sum(p.numel() for p in model.parameters()))
    yield live
    live.stop()


def _greedy(client, model: str, text: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}
    return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_adapters_share_one_base_and_one_batch(adapter_server):
    from frugal_rlhf.serve.command import parse_adapters

    base_size, lora_size, total = adapter_server.sizes
    assert total == base_size + lora_size  # the base once plus the adapters: no merged copies
    live, names = adapter_server, ["tiny-llama", "ppo", "dpo"]
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == names
        assert c.get("/v1/models/dpo").json()["id"] == "dpo"
        alone = [_greedy(c, name, "Hello there", 16) for name in names]
        assert len(set(alone)) == 3  # each policy answers its own way
        bodies = [{"model": name, "messages": USER, "max_tokens": 16, "temperature": 0} for name in names]
        together = _concurrently(live, bodies * 2)
        assert [r.json()["model"] for r in together] == names * 2
        assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone * 2
        assert c.get("/health").json()["largest_batch"] > 1  # mixed-adapter rows shared a batch
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters(["no-equals-sign"])


def test_chat_page_puts_two_adapters_side_by_side(adapter_server):
    with _chat_page(adapter_server.url) as page:
        page.select_option("#pick", "ppo")
        page.select_option("#versus", "dpo")
        page.click("details.settings summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.fill("#input", "Compare!")
        page.press("#input", "Enter")
        page.locator(".turn.pair .msg.assistant[data-done='true']").nth(1).wait_for(timeout=20_000)
        shown = {b.get_attribute("data-model"): b.inner_text().removesuffix("(cut at max tokens)").rstrip("\n")
                 for b in page.locator(".turn.pair .msg.assistant").all()}
    with httpx.Client(base_url=adapter_server.url, timeout=TIMEOUT) as c:
        assert shown == {name: _greedy(c, name, "Compare!", 12) for name in ("ppo", "dpo")}


# --- issue 22: continuous batching ---------------------------------------------------------


def _short_behind_long(continuous: bool):
    """A 250-token request runs; a 5-token one arrives after its first token. Returns the
    engine's decode steps from the short one's submission to its end, whether the long one was
    still running then, and the short one's text."""
    from frugal_rlhf.serve.engine import Engine, Finished, Job
    from frugal_rlhf.serve.sampler import RowSettings

    model, tokenizer = load_model("tiny-llama")
    model = PrintableOnly(model, tokenizer).eval()
    engine = Engine(model, tokenizer, max_batch=4, threads=1, continuous=continuous).start()
    started, done, seen = threading.Event(), threading.Event(), {"text": ""}
    long_done = threading.Event()

    def long_emit(event):
        started.set()
        if isinstance(event, Finished):
            long_done.set()

    def short_emit(event):
        if isinstance(event, Finished):
            seen["end"], seen["long_running"] = engine._counters["decode_steps"], not long_done.is_set()
            done.set()
        elif hasattr(event, "text"):
            seen["text"] += event.text

    ids = tokenizer("Tell me a long story", add_special_tokens=False)["input_ids"]
    greedy = RowSettings(temperature=0.0)
    try:
        engine.submit([Job(ids, 250, greedy, emit=long_emit)])
        assert started.wait(TIMEOUT)
        begin = engine.stats()["decode_steps"]
        engine.submit([Job(tokenizer("Hi", add_special_tokens=False)["input_ids"], 5, greedy, emit=short_emit)])
        assert done.wait(TIMEOUT) and long_done.wait(TIMEOUT)
    finally:
        engine.close()
    return seen["end"] - begin, seen["long_running"], seen["text"]


def test_a_short_request_behind_a_long_one_finishes_in_its_own_steps():
    """Continuous batching: the short request joins the running batch at the next step and
    leaves after its 5 tokens (1 from its prefill, 4 decode steps; one more step may pass
    between its arrival and its join), while the long one keeps running. Static batching
    makes it wait for the long one's ~250 steps. Its answer is the same either way."""
    steps, long_running, text = _short_behind_long(continuous=True)
    assert steps <= 5 and long_running, steps
    static_steps, static_long_running, static_text = _short_behind_long(continuous=False)
    assert static_steps >= 240 and not static_long_running, static_steps
    assert text == static_text and len(text) == 5
