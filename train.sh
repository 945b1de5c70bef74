#!/usr/bin/env bash
# With no arguments: set up .venv if needed and train GRPO-CARE on the built-in toy world (CPU is fine).
# With arguments: passed through to grpo_care.py, e.g.
#   ./train.sh --model_path Qwen/Qwen2.5-VL-7B-Instruct --data_root /data/SEED-Bench-R1
# Multi-GPU: ACCELERATE_CONFIG=configs/fsdp_4gpu.yaml ./train.sh --model_path ... --data_root ...
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  touch .venv/.installed
fi
export TOKENIZERS_PARALLELISM=false
launch=(.venv/bin/accelerate launch)
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  launch+=(--config_file "$ACCELERATE_CONFIG")
else
  launch+=(--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
fi
exec "${launch[@]}" grpo_care.py "$@"
