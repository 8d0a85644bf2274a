"""Verifiable rewards from specs (rl/rewards.py), prompt rows with answers, the math generator."""
import json
import threading

import pytest

from frugal_rlhf.cli import main
from frugal_rlhf.data.formats import DataError, load_dataset_file, normalize
from frugal_rlhf.data.math_problems import generate, split_of
from frugal_rlhf.rl.rewards import RewardError, RewardSet, final_answer, parse_reward
from test_run_safety import run_cli

ROWS = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "reference": "5", "answer": "5"},
        {"prompt": [{"role": "user", "content": "What is 10 + 4?"}], "reference": "14", "answer": "14"}]


# ---- user functions for python: specs (this module is importable as test_rlvr_rewards)
def echo_length(prompts, completions, rows):
    return [float(len(c)) for c in completions]


def wrong_shape(prompts, completions, rows):
    return [1.0]


def gives_nan(prompts, completions, rows):
    return [float("nan")] * len(completions)


def fails_on_fourteen(prompts, completions, rows):
    return [1.0 / (r["answer"] != "14") for r in rows]


HANG = threading.Event()  # set when a test is done: the hung reward threads it left then return


def hangs(prompts, completions, rows):
    HANG.wait(120)
    return [0.0] * len(completions)


CALLS = {"n": 0}


def hangs_after_the_probe(prompts, completions, rows):
    CALLS["n"] += 1
    return hangs(prompts, completions, rows) if CALLS["n"] > 1 else [0.0] * len(completions)


def exits_quietly(prompts, completions, rows):
    raise SystemExit(0)


def fails_on_batches(prompts, completions, rows):
    if len(completions) > 1:
        raise MemoryError("a batch is too much for me")
    return [1.0]


@pytest.fixture
def release_hung_rewards():
    HANG.clear()
    CALLS["n"] = 0
    yield
    HANG.set()


@pytest.mark.parametrize("text, strict, lenient", [
    ("5", 5.0, 5.0),
    (" 1,234. ", 1234.0, 1234.0),
    ("I think 3 + 2 gives 5", None, 5.0),
    ("Adding them: 7 then 8\n#### 15", 15.0, 15.0),
    ("The answer is 42.", 42.0, 42.0),
    ("so \\boxed{-3} it is", -3.0, -3.0),
    ("<answer>12</answer> and then 13", 12.0, 13.0),
    ("no number here", None, None),
])
def test_final_answer_strict_and_lenient(text, strict, lenient):
    assert final_answer(text, strict=True) == strict
    assert final_answer(text, strict=False) == lenient


def test_specs_parse_with_weights_and_compose():
    rewards = RewardSet(["math", "math:strict=0.5", "format:^\\d+$=0.2", "length:4=0.1"])
    assert [(c.name, c.weight) for c in rewards.components] == [
        ("math", 1.0), ("math_strict", 0.5), ("format", 0.2), ("length", 0.1)]
    total, parts = rewards(["q1", "q2"], ["5", "it is 14"], ROWS, [4, 8])
    # row 1: math 1, strict 1, format 1, length 1 -> 1 + 0.5 + 0.2 + 0.1; row 2: math 1, rest 0, length 0
    assert total.tolist() == pytest.approx([1.8, 1.0])
    assert parts["reward_math_strict"].tolist() == [1.0, 0.0] and parts["reward_length"].tolist() == [1.0, 0.0]
    assert parse_reward("format:a=b").arg == "a=b"  # '=' not followed by a number belongs to the regex


def test_python_reward_gets_prompts_completions_and_rows():
    total, parts = RewardSet(["python:test_rlvr_rewards:echo_length=2"])(["q", "q"], ["ab", "abcd"], ROWS, [1, 1])
    assert total.tolist() == [4.0, 8.0] and parts["reward_echo_length"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown reward 'nonsense'"),
    ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("python:test_rlvr_rewards:missing", "has no function 'missing'"),
    ("format:(", "bad regular expression"),
    ("length:-3", "positive number"),
    ("math:exact", "math takes :strict or :lenient"),
    ("rm:/no/such/dir", "reward-model directory"),
])
def test_bad_specs_fail_when_parsed(spec, message):
    with pytest.raises(RewardError, match=message):
        RewardSet([spec])


def test_bad_reward_values_and_raising_functions_name_the_row():
    with pytest.raises(RewardError, match=r"shape \(1,\) for 2 completions"):
        RewardSet(["python:test_rlvr_rewards:wrong_shape"]).probe(ROWS)
    with pytest.raises(RewardError, match="returned nan on row 0"):
        RewardSet(["python:test_rlvr_rewards:gives_nan"]).probe(ROWS)
    with pytest.raises(RewardError, match=r"ZeroDivisionError.*row 1 of the batch \(prompt 'What is 10 \+ 4\?', "
                                          r"completion 'fourteen'\)"):
        RewardSet(["python:test_rlvr_rewards:fails_on_fourteen"])(["What is 2 + 3?", "What is 10 + 4?"],
                                                                 ["five", "fourteen"], ROWS, [1, 1])


def test_math_reward_needs_answers_in_every_row():
    with pytest.raises(RewardError, match="row 2: field 'answer'"):
        RewardSet(["math"]).check_rows([ROWS[0], {"prompt": ROWS[1]["prompt"], "reference": None}], "p.jsonl")


def test_cli_rejects_a_bad_reward_in_one_line_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import frugal_rlhf.models.build as build

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": 2}) + "\n")
    for spec in ("nonsense", "python:no_such_module_xyz:f", "python:test_rlvr_rewards:gives_nan", "python:..evil:fn",
                 "math=1e400"):
        code = main(["ppo", "--model", "tiny-llama", "--prompts", str(data), "--reward", spec, "--advantage", "group",
                     "--group-size", "2", "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()  # logs, then the error
        assert code == 2 and err[-1].startswith("frugal ppo: error:"), err
        assert not any("Traceback" in line for line in err)


def test_prompt_answer_and_gsm8k_rows(tmp_path):
    rows, _ = normalize([{"prompt": "What is 2 + 2?", "answer": 4}], "prompt")
    assert rows == [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "reference": "4", "answer": "4"}]
    gsm = {"question": "Tom has 3 boxes of 400 pens. How many pens?", "answer": "3 * 400 = 1200\n#### 1,200"}
    rows, _ = normalize([gsm], "prompt")
    assert rows[0]["answer"] == "1200" and rows[0]["reference"].startswith("3 * 400")
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(gsm) + "\n" + json.dumps({"question": "Q?", "answer": "no final answer"}) + "\n")
    with pytest.raises(DataError, match=r"gsm.jsonl.*row 2.*answer.*####"):
        load_dataset_file(str(path), "prompt")
    assert len(load_dataset_file(str(path), "prompt", skip_bad_rows=True)) == 1
    with pytest.raises(DataError, match="answer.*wrong type"):
        normalize([{"prompt": "Q?", "answer": [1]}], "prompt")


def test_math_problems_are_exact_deterministic_and_splits_never_overlap():
    train = generate(300, 2, seed=0, split="train")
    test = generate(200, 2, seed=1, split="test")
    assert generate(300, 2, seed=0, split="train") == train
    for r in train[:50]:
        a, b = map(int, r["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
        assert int(r["answer"]) == a + b
    key = lambda r: r["prompt"]  # noqa: E731 (level 2's wording is fixed: the text is the problem)
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert len({key(r) for r in train}) == 300
    assert split_of((2, "+", 40, 28)) == split_of((2, "+", 40, 28))
    for level in (3, 4, 5):
        assert all(r["answer"].lstrip("-").isdigit() for r in generate(20, level, split="test"))
    with pytest.raises(ValueError, match="only about"):
        generate(500, 1)


# ---- issue 37: user code cannot hang the run or end it quietly ------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("python:..evil:fn", "'..evil' is not a module path"),
    ("math=1e400", "the weight 1e400 is not a finite number"),
])
def test_specs_that_cannot_work_are_refused_when_parsed(spec, message):
    with pytest.raises(RewardError, match=message):
        RewardSet([spec])


def test_a_hanging_exiting_or_batch_failing_reward_is_one_error(release_hung_rewards):
    with pytest.raises(RewardError, match=r"reward hangs did not return within 0.2 s on 2 completions "
                                          r"\(--reward-timeout\)"):
        RewardSet(["python:test_rlvr_rewards:hangs"], timeout=0.2).probe(ROWS)
    with pytest.raises(RewardError, match=r"reward exits_quietly called sys.exit\(0\)"):
        RewardSet(["python:test_rlvr_rewards:exits_quietly"]).probe(ROWS)
    with pytest.raises(RewardError, match=r"reward fails_on_batches raised MemoryError: a batch is too much for me on "
                                          r"a batch of 2 completions \(on none of them alone\)"):
        RewardSet(["python:test_rlvr_rewards:fails_on_batches"]).probe(ROWS)


@pytest.mark.parametrize("reward, flags, message", [
    ("hangs_after_the_probe", ["--reward-timeout", 1], "reward hangs_after_the_probe did not return within 1 s"),
    ("exits_quietly", [], "reward exits_quietly called sys.exit(0)"),
])
def test_a_reward_that_hangs_mid_run_or_exits_stops_the_run_with_one_line(tmp_path, capsys, release_hung_rewards,
                                                                          reward, flags, message):
    """Past the probe, in a training step: a non-zero exit and one line, never exit 0 without a model."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "ppo", "--model", "tiny-llama", "--prompts", data, "--reward",
                           f"python:test_rlvr_rewards:{reward}", "--advantage", "group", "--group-size", 2,
                           "--rollout-batch-size", 2, "--batch-size", 4, "--max-new-tokens", 4, "--max-steps", 2,
                           "--eval-prompts", 2, "--save-every", 0, *flags, "--dtype", "fp32", "--output", out)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "final").exists()
