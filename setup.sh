#!/usr/bin/env bash
# Sourced by test.sh, train.sh and bench/care_vs_grpo.sh: create .venv if absent and install
# requirements.txt (first run ~3 min, torch from this machine's local files; a stamp skips pip afterwards).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  touch .venv/.installed
fi
export TOKENIZERS_PARALLELISM=false

# `"${launch[@]}" script.py ...`: one process, or the accelerate config named by $ACCELERATE_CONFIG.
launch=(.venv/bin/accelerate launch)
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  launch+=(--config_file "$ACCELERATE_CONFIG")
else
  launch+=(--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
fi

# toy_warm_start TOY_DIR SFT_DIR: the toy world and its SFT warm start (sft.py's toy defaults), both
# cached; a rebuilt toy world (another toy.json) redoes the warm start. ~2 min on 2 CPU cores.
toy_warm_start() {
  .venv/bin/python toy.py --out "$1"
  if ! cmp -s "$1/toy.json" "$2/toy.json"; then
    rm -rf "$2"
    "${launch[@]}" sft.py --toy_dir "$1" --output_dir "$2"
    cp "$1/toy.json" "$2/toy.json"
  fi
}
