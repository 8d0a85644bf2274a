"""The `vllm` rollout engine: rollouts sampled by vLLM in its own process and environment.

vLLM pins transformers below the version this project is tested with, so it never runs in this
environment: `make vllm-env` builds `.venv-vllm`, and this engine starts generation/vllm_server.py
with that environment's python (or talks to a server already running elsewhere: `server=URL`, or
FRUGAL_ROLLOUT_SERVER). Only the standard library is used on this side.

- The server loads the frozen base once (written from the policy, adapters off, as a Hugging Face
  checkpoint). Each `sync` after an update makes the next rollout push the actor's LoRA adapter as
  a new adapter (a new name and id: vLLM caches adapters by id); a policy without an adapter
  (full fine-tuning) pushes its weights instead, loaded in place.
- Prompts go as token ids, answers come back as token ids with vLLM's log-prob of each sampled
  token (the server's docstring says which distribution that is).
- Sampling seeds are drawn from the run's generator: a resumed run draws the same ones.
- Colocated with training on a GPU, the server sleeps (vLLM's sleep mode, level 1) between
  rollouts, handing its memory to the update. vLLM's CPU build has no sleep mode.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import engine_choice
from ..errors import FrugalError, UserError
from ..models.export import export_adapter, export_merged
from .engines import RolloutEngine
from .rollout import Rollout

SERVER = Path(__file__).with_name("vllm_server.py")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# No proxy between the trainer and its server, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def to_rollout(input_ids, attention_mask, tokens: list[list[int]], logprobs: list[list[float]],
               pad_token_id: int) -> Rollout:
    """A Rollout from per-row answers (each ending at its stop token or at the length cap): the
    answer columns are as many as the longest answer, padded after each row's end."""
    width = max((len(t) for t in tokens), default=0)
    batch = len(tokens)
    response = torch.full((batch, width), pad_token_id, dtype=torch.long)
    actions = torch.zeros(batch, width, dtype=torch.long)
    lp = torch.zeros(batch, width, dtype=torch.float32)
    for i, (row, row_lp) in enumerate(zip(tokens, logprobs)):
        response[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        actions[i, :len(row)] = 1
        lp[i, :len(row)] = torch.tensor(row_lp, dtype=torch.float32)
    device = input_ids.device
    ids, mask = input_ids.long(), attention_mask.long().to(device)
    actions, response, lp = actions.to(device), response.to(device), lp.to(device)
    return Rollout(torch.cat([ids, response], 1), torch.cat([mask, actions], 1), actions, ids.shape[1], lp)


def _tar(directory: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(directory.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


class VLLMEngine(RolloutEngine):
    name = "vllm"
    matches_trainer = False  # other kernels (and, on a quantized base, de-quantized weights)

    def __init__(self, server: str | None = None, autocast=None, tokenizer=None, quant: str = "f16",
                 enforce_eager: bool | None = None, sleep: bool | None = None, start_timeout: float = 1800.0):
        """`server`: URL of a running server (default FRUGAL_ROLLOUT_SERVER; none: start one here).
        `enforce_eager` (default: on CPU) skips torch.compile and CUDA graphs; `sleep` (default:
        on CUDA, for a server started here) frees its GPU memory between rollouts. `autocast` and
        `tokenizer` are unused (vLLM computes in the dtype of the weights it is given, on token ids);
        `quant` is llama.cpp's choice of weight format: vLLM serves the base's own dtype."""
        if quant not in ("f16", "base"):  # f16: the flag's default, which every engine is given
            raise UserError(f"--rollout-quant {quant} is for llamacpp; vllm serves the base in its own dtype")
        self.url = (server or os.environ.get("FRUGAL_ROLLOUT_SERVER") or "").rstrip("/") or None
        self.remote = self.url is not None
        if self.remote and not self.url.startswith(("http://", "https://")):
            raise UserError(f"rollout server: expected a URL like http://host:port, got {self.url!r}")
        # A server started here gets a fresh key; one given by URL the key its owner set (if any).
        self.key = os.environ.get("FRUGAL_ROLLOUT_KEY") if self.remote else secrets.token_hex(16)
        self.python = None if self.remote else engine_choice.vllm_python()
        if not self.remote and self.python is None:
            raise UserError(engine_choice.missing("vllm"))
        self.enforce_eager, self.sleep, self.start_timeout = enforce_eager, sleep, start_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="frugal-vllm-"))
        self.proc = None
        self.stale = True  # the server has not got the policy's current weights yet
        self.asleep = False
        self.pushes = 0
        self.pushed = None  # the directory the server loaded last (kept while it may read it)
        self.adapter = None  # the adapter name the server samples with (None: its own weights)
        atexit.register(self.close)

    # ---- the interface -----------------------------------------------------------------------
    def sync(self, policy) -> None:
        self.stale = True  # pushed before the next rollout, after the server wakes

    def generate(self, policy, input_ids, attention_mask, config, generator=None, group=1) -> Rollout:
        """`group` needs nothing here: vLLM's prefix cache shares the prompt of a group's copies."""
        if config.max_new_tokens == 0:
            return to_rollout(input_ids, attention_mask, [[]] * input_ids.shape[0], [[]] * input_ids.shape[0],
                              config.pad_token_id)
        self._ready(policy)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        seeds = None
        if config.temperature > 0 and generator is not None:
            seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator, device=generator.device).tolist()
        reply = self._call("/generate", {
            "prompts": prompts, "max_tokens": config.max_new_tokens, "temperature": config.temperature,
            "top_k": config.top_k, "top_p": config.top_p, "stop_token_ids": list(config.eos_token_ids),
            "seeds": seeds, "adapter": self.adapter})
        if self.sleep:
            self._call("/sleep", {})
            self.asleep = True
        return to_rollout(input_ids, attention_mask, reply["tokens"], reply["logprobs"], config.pad_token_id)

    def close(self) -> None:
        """Stop the server this engine started (a later rollout starts another) and drop its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not self.remote:
            self.url = None
        self.stale, self.asleep, self.pushed, self.adapter = True, False, None, None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- the server --------------------------------------------------------------------------
    def _ready(self, policy):
        lora = _lora_rank(policy)
        if self.url is None:
            self._start(policy, lora)
        elif self.pushes == 0 and self.remote:
            self._check_remote(policy, lora)
        if self.asleep:
            self._call("/wake_up", {})
            self.asleep = False
        if self.stale:
            self._push(policy, lora)
            self.stale = False

    def _start(self, policy, lora: int):
        device = next(policy.parameters()).device
        base = self.workdir / "base"
        role = SimpleNamespace(lm=policy.lm, adapter=None)  # the base, adapters off
        export_merged(role, None, base, _weights_dtype(policy))
        eager = device.type == "cpu" if self.enforce_eager is None else self.enforce_eager
        if self.sleep is None:
            self.sleep = device.type == "cuda"
        port_file = self.workdir / "port"
        cmd = [self.python, str(SERVER), "--model", str(base), "--port", "0", "--port-file", str(port_file),
               "--dtype", _DTYPES[_weights_dtype(policy)], "--max-lora-rank", str(lora), "--parent", str(os.getpid()),
               *(["--enforce-eager"] if eager else []), *(["--sleep"] if self.sleep else []),
               *shlex.split(os.environ.get("FRUGAL_VLLM_ARGS", ""))]
        log = self.workdir / "server.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **_same_gpu(device), "FRUGAL_ROLLOUT_KEY": self.key})
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not ready after {self.start_timeout:.0f} s")
                tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
                self.close()
                raise FrugalError(f"vllm server {why}: {tail[0] if tail else 'no output'}")
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.stale = bool(lora)  # without LoRA it was started from the policy's current weights

    def _check_remote(self, policy, lora: int):
        health = self._call("/health")
        vocab = policy.lm.hf_model().config.get_text_config().vocab_size
        if health["vocab_size"] != vocab:
            raise UserError(f"rollout server {self.url} serves {health['model']} (vocabulary {health['vocab_size']}), "
                            f"not this run's base (vocabulary {vocab})")
        if lora and health["max_lora_rank"] < lora:
            raise UserError(f"rollout server {self.url}: LoRA rank {lora} needs --max-lora-rank >= {lora}, "
                            f"it serves {health['max_lora_rank']}")

    def _push(self, policy, lora: int):
        """Write the policy's adapter (or, without one, its weights) and have the server load it."""
        self.pushes += 1
        # A name no other engine on a shared server uses: the server checks a rollout's adapter by name.
        kind, name = ("adapter" if lora else "weights"), f"{self.workdir.name}-{self.pushes}"
        path = self.workdir / name
        if lora:
            export_adapter(policy, None, path, base="base")
        else:
            export_merged(policy, None, path, _weights_dtype(policy))
        if self.remote:  # the server may be on another machine: send the files
            self._call("/load", data=_tar(path), headers={"X-Kind": kind, "X-Name": name})
            shutil.rmtree(path, ignore_errors=True)
        else:
            self._call("/load", {"kind": kind, "name": name, "path": str(path)})
            if self.pushed is not None:
                shutil.rmtree(self.pushed, ignore_errors=True)  # the server has let go of it
            self.pushed = path
        self.adapter = name if lora else None

    def _call(self, path: str, payload: dict | None = None, data: bytes | None = None,
              headers: dict | None = None) -> dict:
        if payload is not None:
            data, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
        elif data is not None:
            headers = {"Content-Type": "application/x-tar", **(headers or {})}
        headers = {**(headers or {}), **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if data is None else "POST")
        try:
            with _OPENER.open(request) as reply:  # no timeout: a rollout on a CPU can take many minutes
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError):
                message = raw[:200].decode(errors="replace")
            raise FrugalError(f"vllm server {self.url}{path}: {message}") from None
        except (urllib.error.URLError, ConnectionError) as e:
            raise FrugalError(f"vllm server {self.url}: not reachable ({getattr(e, 'reason', e)})") from None


def _same_gpu(device: torch.device) -> dict:
    """The server on the trainer's own GPU (vLLM takes the first one it sees): under DDP each rank's."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": ids[index].strip()}


def _lora_rank(policy) -> int:
    """The rank vLLM must serve for the policy's adapter (0: no adapter, push whole weights)."""
    model = policy.lm.model
    if policy.adapter is None or not hasattr(model, "peft_config"):
        return 0
    config = model.peft_config[policy.adapter]
    return max([config.r, *config.rank_pattern.values()])


def _weights_dtype(policy) -> torch.dtype:
    """The dtype the weights are written in: the base's (fp32 for fully trained weights). A
    quantized base is written de-quantized, in the dtype its embeddings are kept in."""
    dtype = policy.lm.hf_model().get_input_embeddings().weight.dtype
    if dtype not in _DTYPES:
        raise UserError(f"rollout engine vllm: cannot serve weights stored as {dtype}")
    return dtype
