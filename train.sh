#!/usr/bin/env bash
# With no arguments: the toy replica of the paper, on CPU, in under 10 minutes —
#   build the toy world (cached) -> SFT warm start (cached) -> evaluate L1/L2/L3
#   -> GRPO-CARE -> evaluate, and plain GRPO from the same warm start and seed -> evaluate,
#   then one table (warm start | GRPO | GRPO-CARE) and the training curves (outputs/toy/curves.png).
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
toy=.cache/toy sft=outputs/toy_sft
py=.venv/bin/python
start=$(date +%s)
toy_warm_start "$toy" "$sft"  # cached; delete outputs/toy_sft to redo it
evaluate() { $py evaluate.py --model_path "$1" --data_root "$toy/data" --toy --max_new_tokens 96 --output_dir "$2"; }
[ -f "$sft/eval/results.json" ] || evaluate "$sft" "$sft/eval"
for method in care grpo; do  # the same warm start, seed and steps; only the reward differs
  rl=outputs/toy$([ $method = grpo ] && echo _grpo || true)
  rm -rf "$rl"
  "${launch[@]}" grpo_care.py --toy true --model_path "$sft" --data_root "$toy/data" --output_dir "$rl" \
    --consistency_reward "$([ $method = care ] && echo care || echo none)"
  final=$(ls -d "$rl"/checkpoint-* | sort -t- -k2 -n | tail -1)
  evaluate "$final" "$rl/eval"
done
$py - "$sft/eval/results.json" outputs/toy_grpo/eval/results.json outputs/toy/eval/results.json "$start" <<'PY'
import json, sys, time
runs = [json.load(open(p))["levels"] for p in sys.argv[1:4]]
pct = lambda v: "–" if v is None else f"{v:.1f}"
rows = [(f"{lv} strict accuracy (%)", lambda r, lv=lv: r[lv]["strict"]) for lv in ("L1", "L2", "L3")]
rows += [(f"{lv} rule consistency (%)", lambda r, lv=lv: r[lv].get("rule_consistency")) for lv in ("L1", "L2", "L3")]
cells = [("reasoning right, answer right", "right_reasoning_right_answer"),
         ("reasoning right, answer wrong", "right_reasoning_wrong_answer"),
         ("reasoning wrong, answer right", "wrong_reasoning_right_answer"),
         ("reasoning wrong, answer wrong", "wrong_reasoning_wrong_answer")]
rows += [(f"L1 orange rows: {name} (%)", lambda r, k=k: r["L1"]["flaw_classes"]["orange"][k]) for name, k in cells]
print(f"\n{'toy world, 200 rows per level':<50}{'warm start':>12}{'GRPO':>8}{'GRPO-CARE':>11}")
for name, get in rows:
    print(f"{name:<50}" + "".join(f"{pct(get(r)):>{w}}" for r, w in zip(runs, (12, 8, 11))))
n = runs[0]["L1"]["flaw_classes"]["orange"]["n"]
print(f"\nL1 orange rows ({n}): the teacher reads orange as red; 'reasoning wrong, answer right' is right for the wrong reason")
import logs  # one picture: the two runs' curves overlaid, the orange rows' classes and accuracy of all three
logs.plot_comparison({"GRPO": "outputs/toy_grpo/metrics.jsonl", "GRPO-CARE": "outputs/toy/metrics.jsonl"},
                     dict(zip(("warm start", "GRPO", "GRPO-CARE"), sys.argv[1:4])), "outputs/toy/comparison.png")
print(f"total time {time.time() - float(sys.argv[4]):.0f} s; GRPO vs GRPO-CARE: outputs/toy/comparison.png;"
      " every sample CARE rewarded: outputs/toy/completions.jsonl")
PY
