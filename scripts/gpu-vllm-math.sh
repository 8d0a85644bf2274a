#!/usr/bin/env bash
# The vLLM rollout path end to end on a CUDA GPU (not a test: it needs the GPU, and says so without one).
#
#   bash scripts/gpu-vllm-math.sh [OUTPUT_DIR]
#
# 1. make install, make vllm-env (.venv-vllm with vllm 0.33.0 and the CUDA torch it pins);
# 2. the math recipe's quick setting with --rollout-engine vllm: a tiny model, 3 GRPO steps, vLLM
#    colocated with training on the GPU (sleeping during each update), the actor's LoRA pushed
#    after every step; it checks that the rollouts came from vLLM (the engine-vs-trainer mismatch
#    and TIS metrics are in metrics.jsonl) and prints them;
# 3. the vllm engine tests (tests/test_vllm_engine.py: greedy tokens equal to our torch engine's,
#    a LoRA update reaching the server), here with vLLM on the GPU and the trainer on the CPU.
# Budget: under 10 minutes on a fresh clone (most of it installing vLLM's CUDA wheels). vLLM starts
# in eager mode (FRUGAL_VLLM_ARGS=--enforce-eager): this checks the path, not the speed; set
# FRUGAL_VLLM_ARGS= (empty) to let it compile and capture CUDA graphs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then
    echo "gpu-vllm-math: no CUDA GPU here (nvidia-smi fails); this script needs one" >&2
    exit 2
fi
out=${1:-runs/math-quick-vllm-$(date +%Y%m%d-%H%M%S)}
export FRUGAL_VLLM_ARGS=${FRUGAL_VLLM_ARGS---enforce-eager}
start=$SECONDS

make install
make vllm-env
echo "== installs: $((SECONDS - start)) s"

.venv/bin/frugal recipe math --quick --rollout-engine vllm --output "$out"
.venv/bin/python - "$out" <<'EOF'
import json, sys
from pathlib import Path

rows = [json.loads(line) for line in (Path(sys.argv[1]) / "grpo" / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "gen_logprob_mismatch" in r]
if not steps:
    sys.exit("gpu-vllm-math: no step logged an engine mismatch: the rollouts did not come from the vllm engine")
for r in steps:
    print(f"step {r['step']}: |engine - trainer| log-prob max {r['gen_logprob_mismatch']:.4f} "
          f"mean {r['gen_logprob_mismatch_mean']:.4f}, KL {r['gen_kl']:.2e}, "
          f"TIS weight mean {r['tis_weight_mean']:.4f} (clipped {r['tis_clipped_frac']:.3f}), "
          f"rollout {r['time_gen']:.2f} s, peak {r['peak_mem_gb']:.2f} GB")
EOF
echo "== recipe done: $((SECONDS - start)) s"

.venv/bin/python -m pytest -q tests/test_vllm_engine.py
echo "== all done in $((SECONDS - start)) s; the run is in $out"
