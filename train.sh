#!/usr/bin/env bash
# With no arguments: the toy replica of the paper, on CPU, in a few minutes —
#   build the toy world (cached) -> SFT warm start (cached) -> evaluate L1/L2/L3 -> GRPO-CARE -> evaluate,
#   then a before/after table and the training curves (outputs/toy/curves.png).
# With arguments: passed to grpo_care.py, e.g.
#   ./train.sh --model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root /data/SEED-Bench-R1
# Multi-GPU: ACCELERATE_CONFIG=configs/fsdp_4gpu.yaml ./train.sh --model_path ... --data_root ...
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh  # .venv, "${launch[@]}", toy_warm_start
if [ $# -gt 0 ]; then
  exec "${launch[@]}" grpo_care.py "$@"
fi

# --- the default run: the toy world end to end ---
toy=.cache/toy sft=outputs/toy_sft rl=outputs/toy
py=.venv/bin/python
start=$(date +%s)
toy_warm_start "$toy" "$sft"  # cached; delete outputs/toy_sft to redo it
$py evaluate.py --model_path "$sft" --data_root "$toy/data" --toy --max_new_tokens 96 --output_dir "$sft/eval"
rm -rf "$rl"
"${launch[@]}" grpo_care.py --toy true --model_path "$sft" --data_root "$toy/data" --output_dir "$rl"
final=$(ls -d "$rl"/checkpoint-* | sort -t- -k2 -n | tail -1)
$py evaluate.py --model_path "$final" --data_root "$toy/data" --toy --max_new_tokens 96 --output_dir "$final/eval"
$py - "$sft/eval/results.json" "$final/eval/results.json" "$start" <<'PY'
import json, sys, time
before, after = (json.load(open(p))["levels"] for p in sys.argv[1:3])
pct = lambda v: "  –  " if v is None else f"{v:5.1f}"
print(f"\n{'toy world':<28}{'before RL (SFT)':>16}{'after GRPO-CARE':>17}")
for level in ("L1", "L2", "L3"):
    print(f"{level + ' strict accuracy (%)':<28}{pct(before[level]['strict']):>16}{pct(after[level]['strict']):>17}")
for level in ("L1", "L2", "L3"):
    print(f"{level + ' consistency, rule (%)':<28}{pct(before[level].get('rule_consistency')):>16}"
          f"{pct(after[level].get('rule_consistency')):>17}")
print(f"\ntotal time {time.time() - float(sys.argv[3]):.0f} s; curves: outputs/toy/curves.png")
PY
