#!/usr/bin/env bash
# Here, before a GPU is lent: the wheels bench/gpu_run.sh installs on the lent machine, into .whl/ (git-ignored;
# pass it to the device run with carry [".whl"]). That machine is offline, with Python 3.12, torch 2.11.0+cu130,
# torchvision 0.26, transformers 5.17.0 and accelerate 1.15.0; the working tree and .whl/ travel together, 64 MiB
# at most. What travels: transformers 5.23.0 (the project's pin) and what it needs, for CPython 3.12 manylinux.
# Not 5.17.0: it ignores the rollout's precomputed vision features (`mm_encoder_outputs`) without a word, so
# every log-prob would be computed blind to the video (checked here: BENCHMARKS.md section 2). Neither decord
# nor PyAV travels: bench/gpu.py hands the processor frames as arrays and reads no video file.
#     bash bench/gpu_wheels.sh          # ~20 s; prints the total size
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir .whl
"$PIP" download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 2>&1 | grep -v "^WARNING: Location" || true
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "$(ls .whl | wc -l) wheels, $((wheels / 1048576)) MiB; with the working tree $(((wheels + tree) / 1048576)) MiB (limit 64)"
if [ $((wheels + tree)) -gt $((64 * 1048576)) ]; then echo "error: over the 64 MiB a device run carries" >&2; exit 1; fi
