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
    from frugal_rlhf.generation.engines import installed

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
