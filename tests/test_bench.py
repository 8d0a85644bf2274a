import json

import pytest

from frugal_rlhf.bench import workloads
from frugal_rlhf.models.memory import parse_size
from frugal_rlhf.cli import main


def test_bench_generate_times_every_installed_engine(tmp_path):
    """--engine all: a row per installed engine (llama.cpp alone as the anchor), each bound over
    its own copy of the weights (llama.cpp's GGUF in f16: about the bf16/fp32 model's bytes / 1 or 2)."""
    import importlib.util

    out = tmp_path / "gen.json"
    assert main(["bench", "generate", "--model", "tiny-llama", "--engine", "all", "--new-tokens", "2",
                 "--batch-size", "2", "--repeats", "1", "--dtype", "fp32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    from frugal_rlhf.engine_choice import installed

    llama = ["llamacpp", "llamacpp_standalone"] if importlib.util.find_spec("llama_cpp") else []
    vllm = ["vllm"] if installed("vllm") else []
    assert r["engines"] == ["frugal", "hf_generate", *llama, *vllm]
    for name in r["engines"]:
        steps_per_s = r[name]["tokens_per_s"]["median"] / 2
        assert r[name]["bandwidth_fraction"] == pytest.approx(steps_per_s * r[name]["weight_gb"] / r["copy_gb_per_s"])
    for name in llama:  # f16 weights: half the fp32 model's bytes, give or take the f32 norms
        assert r[name]["quant"] == "f16" and r[name]["weight_gb"] == pytest.approx(r["weight_gb"] / 2, rel=0.02)
    for name in vllm:  # the fp32 checkpoint it serves: the model's bytes and a safetensors header
        assert r[name]["weight_gb"] == pytest.approx(r["weight_gb"], rel=0.02)


def test_bench_generate_and_ppo_write_valid_json(tmp_path):
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", "--model", "tiny-llama", "--new-tokens", "8", "--batch-size", "4",
                 "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["frugal"]["tokens_per_s"]["median"] > 0 and r["hf_generate"]["tokens_per_s"]["median"] > 0
    assert r["ratio"] == r["frugal"]["tokens_per_s"]["median"] / r["hf_generate"]["tokens_per_s"]["median"]
    # The bandwidth fraction is steps/s x weight bytes / copy rate: recomputed here from its parts.
    assert r["engines"] == ["frugal", "hf_generate"]
    for name in ("frugal", "hf_generate"):
        steps_per_s = r[name]["tokens_per_s"]["median"] / 4
        assert r[name]["weight_gb"] == r["weight_gb"]
        assert r[name]["bandwidth_fraction"] == pytest.approx(steps_per_s * r["weight_gb"] / r["copy_gb_per_s"])
    out = tmp_path / "ppo.json"
    assert main(["bench", "ppo", "--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--new-tokens", "8",
                 "--strategy", "naive", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["workload"] == "ppo" and r["samples_per_s"]["n"] == 1 and r["peak_mem_gb"] > 0
    assert set(r) >= {"time_gen", "time_score", "time_update"} and (r["strategy"], r["processes"]) == ("naive", 1)
    assert r["predicted_peak_gb"] > 0  # the memory planner's estimate beside the measured peak
    # The plain recipe (four full models, `bench all` and `bench capacity` run it) is one the
    # planner does not model: it runs and reports no prediction.
    assert main(["bench", "ppo", "--model", "tiny-llama", "--steps", "2", "--batch-size", "2", "--new-tokens", "4",
                 "--lora-rank", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["lora_rank"] == 0 and r["peak_mem_gb"] > 0 and "predicted_peak_gb" not in r
    # The reward-model bench's pairs share long prompts: its FLOPs count the tokens the forward ran.
    out = tmp_path / "rm.json"
    assert main(["bench", "rm", "--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["pairs_per_s"]["median"] > 0 and 0 < r["mfu"] <= 1


def test_capacity_search_finds_the_largest_size_each_recipe_fits(monkeypatch):
    sizes = workloads.dummy_sizes()
    llama = [n for n in sizes if not n.startswith("gpt2")]
    assert llama[:2] == ["s", "m"] and llama[-2:] == ["7b", "13b"]
    tried = []

    def fake_fits(stage, model, budget, over):  # a model "fits" below a per-recipe parameter limit
        tried.append(model)
        limit = 500e6 if over["lora_rank"] == 0 else 14e9 if over.get("quantize_base") == "nf4" else 4e9
        return sizes[model] <= limit, 1.0

    monkeypatch.setattr(workloads, "_fits", fake_fits)
    r = workloads.bench_capacity("ppo", "8GiB")
    assert r["plain"]["model"] == max((n for n in llama if sizes[n] <= 500e6), key=sizes.get)
    assert r["frugal"]["model"] == "3b" and r["recipes"] == ["plain", "frugal"]
    assert r["ratio"] == sizes["3b"] / sizes[r["plain"]["model"]]
    assert len(tried) <= 2 * 3  # binary search: log2(8) probes per recipe
    # --quantize-base adds the recipe on a quantized base, its ratio against the same plain row
    r = workloads.bench_capacity("ppo", "8GiB", quantize_base="nf4")
    assert r["recipes"] == ["plain", "frugal", "frugal-nf4"] and r["frugal-nf4"]["model"] == "13b"
    assert r["ratios"]["frugal-nf4"] == sizes["13b"] / sizes[r["plain"]["model"]]
    # --recipes searches only the rows named (no plain row: no ratio), and refuses a name it lacks
    tried.clear()
    r = workloads.bench_capacity("ppo", "8GiB", quantize_base="nf4", recipes=["frugal-nf4"])
    assert r["recipes"] == ["frugal-nf4"] and r["frugal-nf4"]["model"] == "13b" and "plain" not in r
    assert r["ratios"] == {"frugal-nf4": None} and len(tried) <= 4  # one search, not three
    with pytest.raises(ValueError, match="frugal-int8"):
        workloads.bench_capacity("ppo", "8GiB", quantize_base="nf4", recipes=["frugal-int8"])
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("1.5GB") == 1_500_000_000


def test_bench_serve_answers_every_request_and_compares_with_generate(tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", "tiny-llama", "--new-tokens", "8", "--dtype", "fp32",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    per_client = r["settings"]["requests_per_client"]
    served = [row for row in r["rows"] if row["mode"].startswith("server")]
    assert [row["requests"] for row in served] == [c * per_client for c in (1, 4, 16)]
    assert all(row["failed"] == 0 and row["tokens_per_s"] > 0 for row in served)
    assert r["rows"][-1]["mode"] == "generate, one at a time" and r["rows"][-1]["requests"] == 16 * per_client


def test_bench_serve_mixed_runs_every_mode_on_the_same_arrivals():
    from frugal_rlhf.serve.bench_mixed import COLUMNS, bench_serve_mixed, format_table

    r = bench_serve_mixed("tiny-llama", short=3, long=20, requests=6, rate=50.0, long_fraction=0.5, dtype="fp32",
                          threads=1)
    assert [row["mode"] for row in r["rows"]] == ["continuous batching", "static batches", "generate, one at a time"]
    for row in r["rows"]:
        assert all(row[c] is not None for c in COLUMNS) and row["tokens_per_s"] > 0, row
    assert len(format_table(r).splitlines()) == 2 + 3


def test_bench_compare_generate_is_our_sampler_against_hf_generate(tmp_path):
    out = tmp_path / "cmp.json"
    assert main(["bench", "compare", "--stage", "generate", "--model", "tiny-llama", "--new-tokens", "4",
                 "--batch-size", "2", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["workload"] == "generate" and set(r) >= {"frugal", "hf_generate", "ratio"}


def test_bench_strategies_runs_the_command_under_each_strategy(tmp_path, rows):
    """`frugal bench strategies`: one process against 2 under DDP on the same global batch; the
    per-rank peak and step times come from the runs' own metrics; a refused configuration is
    reported with its reason instead of a number."""
    from frugal_rlhf.bench.strategies import bench_strategies, format_table

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = bench_strategies("sft", "tiny-llama", str(data), steps=2, batch_size=2, max_length=64,
                         only=("naive", "ddp"))
    naive, ddp = r["results"]["naive"], r["results"]["ddp"]
    assert (naive["processes"], ddp["processes"]) == (1, 2)
    assert naive["global_batch"] == ddp["global_batch"] == 4
    assert all(v["step_time"]["n"] == 1 and v["peak_mem_gb_per_rank"] > 0 for v in (naive, ddp))
    assert "ddp | 2 |" in format_table(r)
    ppo = bench_strategies("ppo", "tiny-llama", only=("deepspeed zero-3",), reward_model="unused")
    assert ppo["results"]["deepspeed zero-3"]["skipped"].startswith(("refused", "DeepSpeed not installed"))


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_compare_runs_our_side_of_each_stage(tmp_path, stage):
    """Our half of `bench compare` (the peer's needs trl): every stage trains its steps. The SFT
    side once failed, its rows file making its output directory look like another run's."""
    from frugal_rlhf.bench.peers import _frugal, _write_rows

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "chosen": f"It is {2 * i}.",
             "rejected": "I do not know."} for i in range(6)]
    rates = _frugal(stage, "tiny-llama", _write_rows(rows, tmp_path), 3, 2, 64, 4, "fp32", 4)
    assert len(rates) == 2 and all(r > 0 for r in rates)  # 3 steps, the first one warm-up


GRPO_SETTINGS = dict(steps=2, batch_size=4, max_length=64, lora_rank=4, dtype="fp32", new_tokens=4, reward="rm",
                     gradient_checkpointing=False, rollout_quant="f16")


@pytest.mark.parametrize("name", ["frugal", "frugal-llamacpp", "frugal-vllm", "trl", "trl-vllm"])
def test_compare_grpo_row_runs_the_workload(tmp_path, name):
    """Each row of `bench compare --stage grpo`, run as the command runs it (its own process, in
    its own environment for trl-vllm), on a tiny workload; rows whose engine, package or
    environment is missing here skip with how to install it. Every completion must be exactly
    new_tokens long (the runners check it: ours without a stop token, TRL with min_new_tokens or
    vLLM's min_tokens), so a row that ran did the workload. No timing is asserted."""
    from frugal_rlhf.bench.compare import _commands, _run, missing
    from frugal_rlhf.bench.peers import math_rows
    from frugal_rlhf.models.loading import load_model

    why = missing(name)
    if why:
        pytest.skip(why)
    _, tok = load_model("tiny-llama")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in math_rows(8)))
    (argv, env), = _commands([name], "grpo", "tiny-llama", tok, rows, tmp_path, GRPO_SETTINGS).values()
    rate, peak_gb = _run(name, "grpo", argv, env)
    assert rate > 0 and peak_gb > 0


def test_compare_grpo_says_how_to_install_a_missing_row(tmp_path, monkeypatch, capsys):
    """A row whose engine, package or environment is missing is a row saying how to install it,
    in the table and the JSON, not a crash, and the rows that can run still do; with no peer row
    to compare with, the ratios are empty."""
    import importlib.util

    from frugal_rlhf.bench import compare
    from frugal_rlhf import engine_choice

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    monkeypatch.setattr(engine_choice, "vllm_python", lambda: None)
    monkeypatch.setattr(compare, "trl_vllm_python", lambda: None)
    monkeypatch.delenv("FRUGAL_ROLLOUT_SERVER", raising=False)
    out = tmp_path / "cmp.json"
    assert main(["bench", "compare", "--stage", "grpo", "--model", "tiny-llama", "--rollout-engine", "torch,vllm",
                 "--steps", "2", "--batch-size", "4", "--new-tokens", "4", "--repeats", "1", "--reward", "math",
                 "--dtype", "fp32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["rows"] == ["frugal", "frugal-vllm", "trl", "trl-vllm"] and r["ratio"] is None and r["best"] is None
    assert r["frugal"]["n"] == 1 and r["frugal"]["median"] > 0 and r["frugal"]["peak_mem_gb"] > 0
    assert "make vllm-env" in r["frugal-vllm"]["not_installed"]
    assert "pip install -e .[peers]" in r["trl"]["not_installed"]
    assert "make trl-vllm-env" in r["trl-vllm"]["not_installed"]
    table = capsys.readouterr().out.splitlines()
    assert len([line for line in table if "not installed: " in line]) == 3
    assert any(line.startswith("| frugal-rlhf, torch engine | ") and "GiB" in line for line in table)
    with pytest.raises(SystemExit):  # an engine name it does not know, refused at parse time
        main(["bench", "compare", "--stage", "grpo", "--rollout-engine", "torch,llama"])
    assert "--rollout-engine" in capsys.readouterr().err


# Run in TRL's vLLM environment by the test below: an adapter the size of a trained one, TRL's
# weight sync (bench/trl_grpo.py's, on CPU), then vLLM's greedy answer against the trainer's forward.
SYNC_PROBE = '''
import json, sys
import torch
from vllm import SamplingParams
from frugal_rlhf.bench.trl_grpo import grpo_trainer

trainer, _, _ = grpo_trainer(json.loads(open(sys.argv[1]).read()))
model = trainer.model
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
trainer.vllm_generation.sync_weights()
prompt = [72, 101, 108, 108, 111, 32, 119]
ids = list(prompt)
model.eval()
with torch.no_grad():  # the trainer's greedy answer, one full forward per token
    for _ in range(8):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float()
sample = trainer.vllm_generation.llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
    max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
top2 = logits.topk(2, -1).values
print("PROBE " + json.dumps({
    "trainer_ids": ids[len(prompt):], "vllm_ids": list(sample.token_ids),
    "trainer": torch.log_softmax(logits, -1).gather(1, torch.tensor([ids[len(prompt):]]).T)[:, 0].tolist(),
    "vllm": [s[t].logprob for s, t in zip(sample.logprobs, sample.token_ids)],
    "gap": float((top2[:, 0] - top2[:, 1]).min()), "max_logit": float(logits.abs().max())}))
'''


def test_trl_vllm_samples_from_the_weights_trl_syncs(tmp_path):
    """TRL's own colocated weight sync fails on vLLM's CPU build; bench/trl_grpo.py syncs the same
    merged weights through vLLM's reload. After a sync of an adapter the size of a trained one,
    vLLM's greedy tokens equal the trainer's (no near-tie on the path: checked) and its log-probs
    equal the trainer's forward within the fp32 rounding bound. A sync that did not reach vLLM
    fails both (its greedy answer differed from the first token on, when tried)."""
    import subprocess

    from conftest import fp32_logprob_bound
    from frugal_rlhf.bench.compare import _package_only_path, _trl_model
    from frugal_rlhf.bench.peers import math_rows
    from frugal_rlhf.bench.trl_grpo import TRL_VLLM_INSTALL, trl_vllm_python
    from frugal_rlhf.models.loading import load_model

    if trl_vllm_python() is None:
        pytest.skip(f"no TRL + vLLM environment: {TRL_VLLM_INSTALL}")
    lm, tok = load_model("tiny-llama")
    model_dir, tok_dir = _trl_model("tiny-llama", tok, tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in math_rows(4)))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**GRPO_SETTINGS, "rows": str(rows), "model": model_dir, "tokenizer": tok_dir,
                                "use_vllm": True, "output": str(tmp_path / "out")}))
    probe = tmp_path / "probe.py"
    probe.write_text(SYNC_PROBE)
    proc = subprocess.run([trl_vllm_python(), str(probe), str(spec)], capture_output=True, text=True,
                          env=_package_only_path(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")))
    bound = fp32_logprob_bound(lm.config, p["max_logit"])
    assert p["gap"] > bound, f"the greedy path has a near-tie (gap {p['gap']:.2e}, bound {bound:.2e})"
    assert p["vllm_ids"] == p["trainer_ids"]
    assert max(abs(a - b) for a, b in zip(p["vllm"], p["trainer"])) <= bound
