"""`frugal serve MODEL`: argument parsing, model loading and running uvicorn.

The web stack (fastapi, uvicorn) is imported inside the functions that need it, so this
module can be imported by the CLI without the `serve` extra installed.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from frugal_rlhf.device import compute_dtype, default_device
from frugal_rlhf.models.loading import load_model
from frugal_rlhf.serve.engine import Engine
from frugal_rlhf.serve.sampler import BASE

log = logging.getLogger("frugal_rlhf")
# Adapter names a request cannot reach or that mean something else: the engine's name for "no
# adapter", and the name a run's exported model is served under when none is given.
RESERVED_ADAPTER_NAMES = (BASE, "final")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi], else a one-line usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {lo}.." + (str(hi) if hi else ""))
        return value
    parse.__name__ = "int"  # argparse names the type in its message
    return parse


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default="default",
                        help="model spec: default, tiny-llama, a HF directory, a .gguf file or a PEFT adapter")
    parser.add_argument("--host", default="127.0.0.1", help="bind address; the default answers this machine only")
    parser.add_argument("--port", type=_int_in(1, 65535), default=8000, help="TCP port of the API and the chat page")
    parser.add_argument("--api-key-file", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/*, KEY read from this file "
                             "(or set FRUGAL_API_KEY)")
    parser.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # visible in `ps`: kept for old scripts
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="also serve this PEFT LoRA adapter on the same base as model NAME (repeatable)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header names NAME (default: loopback names and "
                             "--host; a wildcard --host without this accepts any)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable); "
                             "none by default")
    parser.add_argument("--max-batch", type=_int_in(1), default=8, help="requests generated together in one batch")
    parser.add_argument("--max-queue", type=_int_in(1), default=64, help="waiting requests before answering 503")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="compute dtype: auto = bf16 where the device runs it fast, else fp32")
    parser.add_argument("--threads", type=_int_in(1), default=None,
                        help="torch threads for generation; unset: the CPUs this process may use, minus one")
    parser.add_argument("--served-model-name", default=None,
                        help="model id the API lists and requests name; unset: the model's file or directory name")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (only for a model you trust)")
    return parser


def model_name_for(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else (path.name if path.exists() else spec)


def load_for_inference(spec: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) on the default device, in the compute dtype, in eval mode."""
    device = default_device()
    model, tokenizer = load_model(spec, dtype=compute_dtype(device, dtype), trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def parse_adapters(specs: list[str], model_name: str | None = None) -> dict[str, str]:
    """["ppo=runs/ppo/adapter", ...] -> {"ppo": "runs/ppo/adapter", ...}. A name must be a plain
    word (peft names modules after it) other than the reserved ones and the base's `model_name`."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        if name in RESERVED_ADAPTER_NAMES or name == model_name:
            raise ValueError(f"--adapter {name}: the name is taken (" + (
                "the base model's" if name == model_name else "reserved") + "); choose another")
        if not re.fullmatch(r"[A-Za-z0-9][\w-]*", name):
            raise ValueError(f"--adapter {name}: a name is letters, digits, '_' and '-'")
        if name in adapters:
            raise ValueError(f"--adapter {name}: given twice")
        adapters[name] = path
    return adapters


def attach_adapters(model, adapters: dict[str, str]):
    """The base with each PEFT LoRA adapter loaded beside the others, unmerged: memory is
    the base plus the adapters, and each request picks one (or none) by name."""
    from peft import PeftModel

    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            peft_model.load_adapter(path, adapter_name=name)
    return (peft_model or model).eval()


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, else FRUGAL_API_KEY, else the hidden --api-key."""
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if os.environ.get("FRUGAL_API_KEY", "").strip():
        return os.environ["FRUGAL_API_KEY"].strip()
    if args.api_key:
        log.warning("--api-key shows the key to every user of this machine (ps); prefer FRUGAL_API_KEY or "
                    "--api-key-file")
    return args.api_key


def make_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8,
             max_queue: int = 64, threads: int | None = None, adapters: tuple[str, ...] = (),
             host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (),
             continuous: bool = True):
    """The app for a server bound to `host`; `adapters` names the LoRA adapters loaded on `model`;
    `continuous=False`: static batches (the benchmark's comparison)."""
    from frugal_rlhf.serve.app import allowed_hosts, build_app

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, threads=threads, adapters=adapters,
                    continuous=continuous)
    return build_app(engine, model_name, api_key, allowed_hosts(host, allow_hosts), cors_origins)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("frugal serve needs the serve extra: pip install 'frugal-rlhf[serve]'", file=sys.stderr)
        return 2
    name = args.served_model_name or model_name_for(args.model)
    try:
        adapters = parse_adapters(args.adapter, name)
        api_key = resolve_api_key(args)
    except (ValueError, OSError) as err:
        print(f"frugal serve: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_for_inference(args.model, args.dtype, args.trust_remote_code)
    model = attach_adapters(model, adapters)
    app = make_app(model, tokenizer, name, api_key,
                   args.max_batch, args.max_queue, args.threads, tuple(adapters), args.host,
                   tuple(args.allow_host), tuple(args.cors_origin))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", args.host)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
    # Ctrl-C stops the server even while requests are open (uvicorn would wait for them forever).
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


@dataclass
class LiveServer:
    """A uvicorn server running in a background thread (tests, benchmarks)."""
    server: object
    thread: threading.Thread
    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> LiveServer:
    """Start `app` on host:port (0 = a free port) and return once it accepts connections."""
    import uvicorn

    # Bind the socket ourselves: with port 0 the kernel picks a free port and no other
    # process can grab it between "find a free port" and "listen".
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on connections whose socket
    # says so, and without it every small SSE chunk can wait ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="frugal-serve-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return LiveServer(server, thread, sock.getsockname()[1], host)
