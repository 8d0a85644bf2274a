"""The server at its edges (issue 37): flags refused when parsed, adapter names that cannot be
reached, a generation worker that dies, and a body without a length that never stops."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_run_safety import SRC
from test_serve import TIMEOUT, USER, _serve, httpx  # first: skips this module without the serve extra

from frugal_rlhf.cli import main
from frugal_rlhf.serve.app import MAX_BODY_BYTES, _read_body
from frugal_rlhf.serve.command import parse_adapters
from frugal_rlhf.serve.schemas import APIError


@pytest.fixture(autouse=True)
def _own_log_handler():
    """main() adds a handler on the captured stderr of its test: removed after it."""
    logging.getLogger("frugal_rlhf").handlers.clear()
    yield
    logging.getLogger("frugal_rlhf").handlers.clear()


@pytest.mark.parametrize("flags, says", [
    (["--threads", "-1"], "argument --threads: -1 is out of range: 1.."),
    (["--port", "99999"], "argument --port: 99999 is out of range: 1..65535"),
    (["--port", "0"], "argument --port: 0 is out of range: 1..65535"),
    (["--max-batch", "0"], "argument --max-batch: 0 is out of range: 1.."),
])
def test_serve_flags_out_of_range_are_refused_when_parsed(capsys, monkeypatch, flags, says):
    import frugal_rlhf.serve.command as command

    monkeypatch.setattr(command, "load_for_inference", lambda *a, **k: pytest.fail("accepted: a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "tiny-llama", *flags])
    assert exit_.value.code == 2 and f"frugal serve: error: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("spec, says", [
    ("final=runs/x/adapter", "--adapter final: the name is taken (reserved)"),
    ("__base__=runs/x/adapter", "--adapter __base__: the name is taken (reserved)"),
    ("tiny-llama=runs/x/adapter", "--adapter tiny-llama: the name is taken (the base model's)"),
    ("a.b=runs/x/adapter", "--adapter a.b: a name is letters, digits, '_' and '-'"),
])
def test_adapter_names_a_request_could_not_reach_are_refused(capsys, monkeypatch, spec, says):
    import frugal_rlhf.serve.command as command

    monkeypatch.setattr(command, "load_for_inference", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["serve", "tiny-llama", "--adapter", spec]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"frugal serve: {says}")
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_adapters([spec], "tiny-llama")


def test_a_dead_worker_says_so_and_requests_fail_at_once():
    """A worker that cannot start (torch refuses -1 threads): /health answers 503 with the reason
    and a request gets a 503 instead of waiting forever."""
    live, _ = _serve(threads=-1)
    try:
        engine = live.server.config.app.state.serve.engine
        engine._thread.join(TIMEOUT)
        assert not engine._thread.is_alive()
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert "set_num_threads" in health.json()["error"]
            r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
            assert r.status_code == 503 and "the generation worker has stopped" in r.json()["error"]["message"]
    finally:
        live.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_stops_a_server_whose_worker_died():
    port = _free_port()
    code = ("import frugal_rlhf.serve.engine as e\n"
            "def broken(self): raise RuntimeError('the worker broke')\n"
            "e.Engine._serve = broken\n"
            f"from frugal_rlhf.cli import main; raise SystemExit(main(['serve', 'tiny-llama', '--port', '{port}']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                health = httpx.get(url + "/health", timeout=TIMEOUT)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health.status_code == 503 and "RuntimeError: the worker broke" in health.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=TIMEOUT)
        assert r.status_code == 503
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()


def test_a_body_without_a_length_is_cut_off_while_it_arrives():
    """A chunked POST declares no Content-Length: the server stops reading past MAX_BODY_BYTES
    instead of holding the whole body (here 16 times the cap) in memory before refusing it."""
    from starlette.requests import Request

    chunk, chunks, received = 64 << 10, (16 * MAX_BODY_BYTES) // (64 << 10), {"n": 0}

    async def receive():
        received["n"] += 1
        return {"type": "http.request", "body": b" " * chunk, "more_body": received["n"] < chunks}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [
        (b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]}
    with pytest.raises(APIError) as error:
        asyncio.run(_read_body(Request(scope, receive)))
    assert error.value.status == 413
    assert received["n"] * chunk <= MAX_BODY_BYTES + chunk


def test_a_chunked_oversized_body_gets_413_from_the_live_server():
    live, _ = _serve()
    sent = {"bytes": 0}

    def body():  # a generator: httpx sends it chunked, with no Content-Length
        for _ in range((MAX_BODY_BYTES >> 16) + 16):
            sent["bytes"] += 1 << 16
            yield b" " * (1 << 16)

    try:
        r = httpx.post(live.url + "/v1/completions", content=body(), timeout=TIMEOUT,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "content-length" not in r.request.headers
        assert httpx.get(live.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    finally:
        live.stop()
