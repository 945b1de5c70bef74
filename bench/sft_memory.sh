#!/usr/bin/env bash
# Peak RSS of sft.py at Qwen's real vocabulary (152,064 rows): the toy world with the 7B's tokenizer, 16 rows a
# step, 3 steps, for each checkout given as DIR=NAME (e.g. a worktree of an older commit, and this one):
#   bench/sft_memory.sh /tmp/old=before "$PWD"=after
# Prints each side's peak RSS, wall time and losses (the same rows, so the same losses).
set -euo pipefail
PY=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
[ -d /tmp/qtoy/model ] || (cd "$(dirname "$0")/.." && $PY toy.py --out /tmp/qtoy --qwen_vocab > /dev/null 2>&1)
for side in "$@"; do
  repo=${side%%=*}; tag=${side##*=}
  rm -rf /tmp/sftq_$tag
  cd $repo && OMP_NUM_THREADS=2 /usr/bin/time -v $PY sft.py --toy true --model_path /tmp/qtoy/model --data_root /tmp/qtoy/data \
    --output_dir /tmp/sftq_$tag --max_steps 3 --prompts_per_device 16 > /tmp/sftq_$tag.log 2>&1
  echo "$tag: $(grep 'Maximum resident' /tmp/sftq_$tag.log) ; $(grep 'Elapsed' /tmp/sftq_$tag.log)"
  python3 -c "import json;print([round(json.loads(l)['loss'],6) for l in open('/tmp/sftq_$tag/metrics.jsonl')])"
done
