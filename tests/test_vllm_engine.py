"""The vllm rollout engine (generation/vllm_engine.py) against our torch engine, the reference.

Tests that start a vLLM server need the vLLM environment (`make vllm-env`, or FRUGAL_VLLM_PYTHON)
and skip elsewhere, saying so. The server computes in fp32 here, as the trainer does, so greedy
tokens are equal wherever the greedy choice is not a near-tie (checked, not assumed) and log-probs
agree up to fp32 rounding (the bound in conftest). Each server starts with enforce_eager on a
tiny model: about 10 s each.
"""
import pytest
import torch

from conftest import fp32_logprob_bound
from frugal_rlhf.errors import FrugalError, UserError
from frugal_rlhf.generation import SampleConfig
from frugal_rlhf.engine_choice import VLLM_INSTALL, vllm_python
from frugal_rlhf.generation.engines import TorchEngine, make_engine
from frugal_rlhf.generation import vllm_engine
from frugal_rlhf.generation.vllm_engine import VLLMEngine, to_rollout
from frugal_rlhf.models.roles import Actor

needs_vllm = pytest.mark.skipif(vllm_python() is None, reason=f"no vLLM environment: {VLLM_INSTALL}")

PAD = 258  # the byte tokenizer's pad; prompts are bytes (< 256)
PROMPTS = [[72, 101, 108, 108, 111, 32, 119], [87, 104, 97], [49, 43, 49, 61, 50, 46]]


def _batch(prompts=PROMPTS):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _config(temperature=0.0, eos=(), steps=16):
    return SampleConfig(max_new_tokens=steps, temperature=temperature, eos_token_ids=eos, pad_token_id=PAD)


def _set_adapter(policy, seed):
    """Adapter weights drawn from `seed` alone (not from the suite's seeded global generator, which
    drew the adapter's initial A): the same model, and the same greedy margins, under any test seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 0.1))


def _gap_and_bound(policy, rollout, temperature):
    """The smallest gap between the best and second-best logit at the rollout's choices (where a
    rounding could flip a greedy token), and the fp32 rounding bound of a log-prob there."""
    n = rollout.action_mask.shape[1]
    with torch.no_grad():
        hidden, head = policy.hidden(rollout.sequences, rollout.attention_mask)
        logits = head(hidden[:, -n - 1:-1]).float()
    top2 = logits.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1])[rollout.action_mask.bool()].min())
    return gap, fp32_logprob_bound(policy.lm.hf_model().config, float(logits.abs().max()) / (temperature or 1.0))


def _assert_same_as_torch(engine, policy, config, generator_seed=None):
    ids, mask = _batch()
    gen = lambda: torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None  # noqa: E731
    ours = TorchEngine().generate(policy, ids, mask, config, gen())
    theirs = engine.generate(policy, ids, mask, config, gen())
    gap, bound = _gap_and_bound(policy, ours, config.temperature)
    if config.temperature <= 0:
        # A flip needs a logit error of half the gap; a logit's error is at most half the log-prob bound.
        assert gap > bound, f"the greedy path has a near-tie (gap {gap:.2e}, rounding bound {bound:.2e})"
        for field in ("sequences", "attention_mask", "action_mask"):
            assert torch.equal(getattr(theirs, field), getattr(ours, field)), field
    act = theirs.action_mask.bool()
    assert torch.all(theirs.logprobs[~act] == 0)
    with torch.no_grad():
        trainer, _ = policy(theirs.sequences, theirs.attention_mask, theirs.action_mask.shape[1],
                            temperature=config.temperature or 1.0)
    mismatch = float((theirs.logprobs - trainer)[act].abs().max())
    assert mismatch <= bound, (mismatch, bound)
    return theirs


@pytest.fixture(scope="module")
def lora_engine():
    engine = VLLMEngine(enforce_eager=True)
    yield engine
    engine.close()


def _lora_policy():
    return Actor("tiny-llama", lora_rank=4, dtype="fp32").eval()


@needs_vllm
def test_greedy_rollouts_equal_the_torch_engine_with_stop_tokens(lora_engine):
    policy = _lora_policy()
    _set_adapter(policy, 1)
    lora_engine.sync(policy)
    free = _assert_same_as_torch(lora_engine, policy, _config())
    # A stop token the first row emits at its 4th step (and not before) must end that row there, in both engines.
    stop = int(free.sequences[0, free.prompt_length + 3])
    assert stop not in free.sequences[0, free.prompt_length:free.prompt_length + 3].tolist()
    stopped = _assert_same_as_torch(lora_engine, policy, _config(eos=(stop,)))
    assert int(stopped.action_mask[0].sum()) == 4


@needs_vllm
def test_a_lora_update_reaches_the_engine(lora_engine):
    policy = _lora_policy()
    _set_adapter(policy, 2)
    lora_engine.sync(policy)
    before = _assert_same_as_torch(lora_engine, policy, _config())
    _set_adapter(policy, 3)  # the update
    lora_engine.sync(policy)
    after = _assert_same_as_torch(lora_engine, policy, _config())
    assert not torch.equal(before.sequences, after.sequences), "the update must change the greedy rollout"


@needs_vllm
def test_sampled_rollouts_follow_the_run_generator_and_report_temperature_logprobs(lora_engine):
    """Log-probs at temperature 0.7 are those of softmax(logits / 0.7), the trainer's own number."""
    policy = _lora_policy()
    _set_adapter(policy, 4)
    lora_engine.sync(policy)
    config = _config(temperature=0.7)
    first = _assert_same_as_torch(lora_engine, policy, config, generator_seed=5)
    again = lora_engine.generate(policy, *_batch(), config, torch.Generator().manual_seed(5))
    other = lora_engine.generate(policy, *_batch(), config, torch.Generator().manual_seed(6))
    assert torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.sequences, other.sequences)


@needs_vllm
def test_an_adapter_pushed_to_a_remote_server_is_uploaded(lora_engine, monkeypatch):
    """A server given by URL may be on another machine: the adapter goes as files, not as a path;
    the engine that started the server then finds its own adapter gone and says so."""
    policy = _lora_policy()
    _set_adapter(policy, 7)
    lora_engine.generate(policy, *_batch(), _config(steps=1))  # the server is up
    monkeypatch.setenv("FRUGAL_ROLLOUT_KEY", lora_engine.key)  # as its owner would on the trainer's machine
    remote = VLLMEngine(server=lora_engine.url)
    try:
        _assert_same_as_torch(remote, policy, _config())
    finally:
        remote.close()
    wide = Actor("tiny-llama", lora_rank=16, dtype="fp32")  # the server serves ranks up to 8 (4, rounded up)
    remote = VLLMEngine(server=lora_engine.url)
    with pytest.raises(UserError, match="max-lora-rank >= 16"):
        remote.generate(wide, *_batch(), _config(steps=1))
    remote.close()
    with pytest.raises(FrugalError, match="is not the one loaded"):
        lora_engine.generate(policy, *_batch(), _config(steps=1))
    lora_engine.sync(policy)  # pushes its adapter again
    _assert_same_as_torch(lora_engine, policy, _config())


@needs_vllm
def test_the_server_refuses_requests_without_its_key(lora_engine):
    import urllib.error
    import urllib.request

    lora_engine.generate(_lora_policy(), *_batch(), _config(steps=1))  # the server is up
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(urllib.request.Request(lora_engine.url + "/health", headers=headers))
        assert err.value.code == 401


@needs_vllm
def test_the_server_refuses_an_upload_that_escapes_its_folder(lora_engine):
    import io
    import tarfile

    policy = _lora_policy()
    lora_engine.generate(policy, *_batch(), _config(steps=1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FrugalError, match="not a readable tar"):
        lora_engine._call("/load", data=buf.getvalue(), headers={"X-Kind": "adapter", "X-Name": "bad"})


@needs_vllm
def test_full_weights_are_loaded_in_place_where_lora_is_off():
    policy = Actor("tiny-llama", dtype="fp32").eval()  # fully trained: no adapter
    engine = VLLMEngine(enforce_eager=True)
    try:
        before = _assert_same_as_torch(engine, policy, _config())
        gen = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        engine.sync(policy)
        after = _assert_same_as_torch(engine, policy, _config())
        assert not torch.equal(before.sequences, after.sequences), "the update must change the greedy rollout"
        engine.close()  # as a trainer does at its end; sampling after that starts a server again
        again = engine.generate(policy, *_batch(), _config())
        assert torch.equal(again.sequences, after.sequences)
    finally:
        engine.close()


def test_answers_become_a_rollout_like_the_torch_engines():
    """to_rollout (the engine's answer lists -> Rollout) gives the torch engine's own rollout back
    from that rollout's answers: the same columns, masks, padding and log-probs."""
    policy = _lora_policy()
    _set_adapter(policy, 9)
    ids, mask = _batch()
    stop = 101
    ours = TorchEngine().generate(policy, ids, mask, _config(temperature=1.0, eos=(stop,)),
                                  torch.Generator().manual_seed(0))
    answers = ours.sequences[:, ours.prompt_length:]
    lengths = ours.action_mask.sum(1).tolist()
    tokens = [row[:n].tolist() for row, n in zip(answers, lengths)]
    logprobs = [row[:n].tolist() for row, n in zip(ours.logprobs, lengths)]
    back = to_rollout(ids, mask, tokens, logprobs, PAD)
    for field in ("sequences", "attention_mask", "action_mask", "logprobs"):
        assert torch.equal(getattr(back, field), getattr(ours, field)), field
    assert back.prompt_length == ours.prompt_length


def test_a_missing_vllm_environment_is_one_line_naming_the_install(monkeypatch):
    from frugal_rlhf import engine_choice

    monkeypatch.setattr(engine_choice, "vllm_python", lambda: None)
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER", raising=False)
    with pytest.raises(UserError, match="make vllm-env") as err:
        make_engine("vllm")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("FRUGAL_ROLLOUT_SERVER", "localhost:8100")
    with pytest.raises(UserError, match="http://host:port"):
        make_engine("vllm")


def test_the_server_will_not_serve_beyond_this_machine_without_a_key():
    """Checked before vLLM is imported: runs with any python."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FRUGAL_ROLLOUT_KEY"}
    for flags, complaint in ((["--host", "0.0.0.0"], "FRUGAL_ROLLOUT_KEY"), (["--port", "70000"], "--port")):
        run = subprocess.run([sys.executable, str(vllm_engine.SERVER), "--model", "unused", *flags], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and complaint in run.stderr.splitlines()[-1], run.stderr


def test_a_server_that_fails_to_start_is_one_line_with_its_reason(monkeypatch):
    """The server checks its flags before importing vLLM, so any python shows the failure path."""
    import sys

    monkeypatch.setenv("FRUGAL_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("FRUGAL_VLLM_ARGS", "--kv-cache-gib -1")
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER", raising=False)
    engine = VLLMEngine()
    with pytest.raises(FrugalError, match=r"vllm server exited with code 2: .*--kv-cache-gib") as err:
        engine.generate(_lora_policy(), *_batch(), _config(steps=1))
    assert "\n" not in str(err.value)
    assert engine.proc is None and not engine.workdir.exists()


@needs_vllm
def test_grpo_samples_on_vllm_with_a_new_adapter_every_step_and_logs_mismatch_and_tis(tmp_path):
    from test_ppo import run_ppo

    trainer, metrics = run_ppo(tmp_path, advantage="group", group_size=4, rollout_batch_size=4, batch_size=16,
                               ppo_epochs=1, max_steps=2, rollout_engine="vllm", tis_cap=2.0, dtype="fp32")
    engine = trainer.engine
    assert engine.name == "vllm" and not engine.matches_trainer
    # The adapter as it starts (for the baseline evaluation and the first rollout), then one after each
    # update: the second rollout's, and the final evaluation's.
    assert engine.pushes == 3
    assert engine.proc is None and not engine.workdir.exists(), "the trainer's end stops the server"
    for m in metrics:
        assert 0.0 <= m["gen_logprob_mismatch_mean"] <= m["gen_logprob_mismatch"], m
        assert m["gen_kl"] >= 0.0 and 0.0 < m["tis_weight_mean"] <= 2.0 and 0.0 <= m["tis_clipped_frac"] <= 1.0, m
    assert (tmp_path / "ppo" / "final" / "config.json").exists()


def test_a_colocated_server_goes_to_the_trainers_own_gpu(monkeypatch):
    """vLLM takes the first GPU it sees: the server is shown only the trainer's (a DDP rank's) GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert vllm_engine._same_gpu(torch.device("cuda", 1)) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert vllm_engine._same_gpu(torch.device("cpu")) == {}
