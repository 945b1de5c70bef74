#!/usr/bin/env bash
# On the lent GPU machine (bare, offline, minutes): install .whl/ (bench/gpu_wheels.sh) and take bench/gpu.py's
# figures in under 8 minutes, each phase under its own time limit so that what finished is kept:
#     bash bench/gpu_run.sh "$OUT"          # on the device: "$OUT"/group.json, decode.json, plan.json, env.txt
#     python bench/gpu.py --report OUT/group.json OUT/decode.json   # back here: BENCHMARKS.md section 2
#     GPU_RUN_DRY=1 PYTHON=.venv/bin/python bash bench/gpu_run.sh /tmp/g   # here: the same steps, CPU dry run
# group + sweep (the training path) first, then the decode levers; the memory plan of the same run beside it
# (bench/memory_plan.py; compare its update and generation phases with group.json's peaks).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_BREAK_SYSTEM_PACKAGES=1
start=$SECONDS
"$py" -m pip install -q --no-index --find-links .whl transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 \
  || { echo "error: the wheels of .whl/ did not install (run bench/gpu_wheels.sh here and carry .whl)"; exit 1; }
"$py" - > "$out/env.txt" <<'PY' || { cat "$out/env.txt"; exit 1; }
import platform, sys, torch, torchvision, transformers, accelerate
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
# 5.17.0 (preinstalled) ignores the rollout's precomputed vision features: refuse to measure it
sys.exit(0 if transformers.__version__ == "5.23.0" else "transformers is not 5.23.0")
PY
cat "$out/env.txt"
echo "installed in $((SECONDS - start)) s"
timeout 90 "$py" bench/vision_features_check.py --model_dir "$out/vf" || exit 1  # the features reach the model
if [ -n "${GPU_RUN_DRY:-}" ]; then
  timeout 120 "$py" bench/gpu.py --dry-run --out "$out/group.json" --model_dir "$out/model"; echo "dry run: exit $?"
  "$py" bench/memory_plan.py --model_path "$out/model" --gpus 1 --json true --attn_implementation sdpa > "$out/plan.json"
  echo "plan: exit $?"
  exit 0
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
timeout 300 "$py" bench/gpu.py --out "$out/group.json" --model_dir .cache/bench-3b --phases group,sweep
echo "group,sweep: exit $? at $((SECONDS - start)) s"
mem=$("$py" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)")
ref=$("$py" -c "print('care' if $mem >= 100 else 'none')")  # bench/gpu.py --ref auto: a separate reference >= 100 GiB
timeout 60 "$py" bench/memory_plan.py --model_path .cache/bench-3b --gpus 1 --gpu_memory_gb "$mem" --json true \
  --prompt_tokens 1455 --vision_tokens 1212 --attn_implementation sdpa --consistency_reward "$ref" > "$out/plan.json"
echo "plan: exit $? at $((SECONDS - start)) s"
left=$((470 - (SECONDS - start)))
if [ "$left" -gt 60 ]; then
  timeout "$left" "$py" bench/gpu.py --out "$out/decode.json" --model_dir .cache/bench-3b --phases decode
  echo "decode: exit $? at $((SECONDS - start)) s"
else
  echo "decode: skipped, $left s left"
fi
