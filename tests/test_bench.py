import json

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
