"""The OpenAI-compatible server, end to end on a live loopback uvicorn with tiny-llama."""
from __future__ import annotations

import json
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


class PrintableOnly(nn.Module):
    """tiny-llama restricted to printable ASCII bytes (and never EOS).

    A random byte-level model emits invalid UTF-8 and special tokens, whose text cannot be
    re-tokenized to count tokens; restricted, every token is one character, and every
    answer runs to max_tokens, so lengths in the tests are exact.
    """

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.config = model, model.config
        allowed = [i for i in range(len(tokenizer)) if len(s := tokenizer.decode([i])) == 1 and 32 <= ord(s) < 127]
        bias = torch.full((len(tokenizer),), float("-inf"))
        bias[allowed] = 0.0
        self.register_buffer("bias", bias)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        return SimpleNamespace(logits=out.logits + self.bias, cache=out.cache)


def _serve(api_key=None, max_batch=8, max_queue=64, printable=True):
    model, tokenizer = load_model("tiny-llama")
    model = PrintableOnly(model, tokenizer).eval() if printable else model.eval()
    # One torch thread: a 1M-parameter model gains nothing from two, and on a busy 2-core
    # machine two OpenMP threads waiting on each other make each step many times slower.
    app = make_app(model, tokenizer, "tiny-llama", api_key, max_batch, max_queue, threads=1)
    return run_in_thread(app), tokenizer


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
    ("/v1/chat/completions", {"messages": USER, "n": 2}, "n"),
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
            assert c.get("/v1/models").status_code == 401
            assert c.get("/health").status_code == 200  # probes need no key
    finally:
        live.stop()


# --- the chat page in headless Chromium ---------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def test_chat_page_streams_an_answer(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright; no browser download)")
    if not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    cancelled_before = httpx.get(server.url + "/health", timeout=TIMEOUT).json()["cancelled"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                       else route.abort())  # loopback only: the page must need nothing else
            page.goto(server.url + "/", timeout=15_000)
            page.wait_for_selector("#model:text('tiny-llama')", timeout=10_000)
            page.set_default_timeout(15_000)
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
            # A long answer shows up while it streams, and Stop aborts it.
            page.fill("#max-tokens", "900")
            page.fill("#input", "Tell me a long story.")
            page.press("#input", "Enter")
            page.wait_for_function("() => { const m = document.querySelector('.msg.assistant.streaming');"
                                   " return m && m.textContent.length > 0; }")
            page.click("#stop")
            note = page.locator(".msg.assistant").nth(2).locator(".note")
            note.wait_for()
            assert note.inner_text() == "(stopped)"
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        after = _wait_idle(http)
    assert after["active"] == 0 and after["cancelled"] == cancelled_before + 1  # Stop freed the slot
    assert (tmp_path / "chat.png").stat().st_size > 0
