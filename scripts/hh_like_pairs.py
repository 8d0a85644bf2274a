"""Preference pairs in Anthropic HH's layout, built from the packaged ShareGPT conversations
(no hub at run time): `chosen` and `rejected` are whole transcripts ("\\n\\nHuman: ...
\\n\\nAssistant: ...") sharing every turn but the last answer; `chosen` ends with the
conversation's own answer, `rejected` with the answer of another conversation. Kept to
transcripts of 256 to 512 tokens of the embedded default's tokenizer, so a reward model reads
HH-length pairs (the memory measurement of docs/benchmarks.md, "The defaults").

    python scripts/hh_like_pairs.py --n 600 --output hh_like.jsonl
"""
import argparse
import json
import random

from frugal_rlhf.data.formats import load_dataset_file
from transformers import AutoTokenizer

from frugal_rlhf.models.loading import resolve_spec


def transcript(messages) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages
                   if m["role"] in ("user", "assistant"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="pairs to write")
    ap.add_argument("--min-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="hh_like.jsonl")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_spec("default"))  # the embedded default's, converted once
    rows = load_dataset_file("sharegpt", "sft")
    random.Random(args.seed).shuffle(rows)
    answers = [r["messages"][-1]["content"] for r in rows if r["messages"][-1]["role"] == "assistant"]
    pairs = []
    for i, row in enumerate(rows):
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        if len(msgs) < 2 or roles != ["user", "assistant"] * (len(msgs) // 2):  # HH alternates, Human first
            continue
        if any("\n\nHuman:" in m["content"] or "\n\nAssistant:" in m["content"] for m in msgs):
            continue  # a turn marker inside a message would split it
        chosen = transcript(msgs)
        rejected = transcript(msgs[:-1] + [{"role": "assistant", "content": answers[(i * 7 + 3) % len(answers)]}])
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (chosen, rejected)]
        if all(args.min_tokens <= n <= args.max_tokens for n in lengths):
            pairs.append({"chosen": chosen, "rejected": rejected})
        if len(pairs) == args.n:
            break
    with open(args.output, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    print(f"{len(pairs)} HH-style pairs ({args.min_tokens}-{args.max_tokens} tokens) -> {args.output}")


if __name__ == "__main__":
    main()
