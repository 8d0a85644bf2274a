import json

from frugal_rlhf import bench
from frugal_rlhf.cli import main


def test_bench_generate_and_ppo_write_valid_json(tmp_path):
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", "--model", "tiny-llama", "--new-tokens", "8", "--batch-size", "4",
                 "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["frugal"]["tokens_per_s"]["median"] > 0 and r["hf_generate"]["tokens_per_s"]["median"] > 0
    assert r["ratio"] == r["frugal"]["tokens_per_s"]["median"] / r["hf_generate"]["tokens_per_s"]["median"]
    out = tmp_path / "ppo.json"
    assert main(["bench", "ppo", "--model", "tiny-llama", "--steps", "2", "--batch-size", "4", "--new-tokens", "8",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["workload"] == "ppo" and r["samples_per_s"]["n"] == 1 and r["peak_mem_gb"] > 0
    assert set(r) >= {"time_gen", "time_score", "time_update"}


def test_capacity_search_finds_the_largest_size_each_recipe_fits(monkeypatch):
    sizes = bench.dummy_sizes()
    llama = [n for n in sizes if not n.startswith("gpt2")]
    assert llama[:2] == ["s", "m"] and llama[-1] == "7b"
    tried = []

    def fake_fits(stage, model, budget, over):  # a model "fits" below a per-recipe parameter limit
        tried.append(model)
        limit = 500e6 if over["lora_rank"] == 0 else 4e9
        return sizes[model] <= limit, 1.0

    monkeypatch.setattr(bench, "_fits", fake_fits)
    r = bench.bench_capacity("ppo", "8GiB")
    assert r["plain"]["model"] == max((n for n in llama if sizes[n] <= 500e6), key=sizes.get)
    assert r["frugal"]["model"] == "3b"
    assert r["ratio"] == sizes["3b"] / sizes[r["plain"]["model"]]
    assert len(tried) <= 2 * 3  # binary search: log2(7) probes per recipe
    assert bench.parse_memory("24GiB") == 24 * 2**30 and bench.parse_memory("1.5GB") == 1_500_000_000
