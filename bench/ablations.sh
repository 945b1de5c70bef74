#!/usr/bin/env bash
# Table 3 in miniature: the eight arms of the paper's ablation (GRPO, KL-EMA, KL-EMA-HA, SepKL-EMA-HA, noKL,
# DenseCons, RefGen, GRPO-CARE) on the toy world, from one warm start, the same seeds and steps for every arm.
# Each arm's flags are read from README.md's table ("The ablations of Table 3"), so the bench runs exactly the
# rows a reader copies. Each run is evaluated on toy L1/L2/L3 (strict accuracy, rule consistency); mean ± sample sd
# over seeds go into RESULTS.md's section "Table 3 in miniature" beside the paper's numbers, with one figure.
#
#   bench/ablations.sh                                  # seeds 1-3, toy defaults (60 steps): ~2.5 min per run
#   SEEDS="1 2 3 4 5" bench/ablations.sh --max_steps 40  # extra arguments go to every grpo_care.py run
#   WARM_START=.cache/toy/model OUT=/tmp/abl RESULTS=/tmp/abl/RESULTS.md EVAL_ARGS="--max_samples 8" \
#     SEEDS=1 bench/ablations.sh --max_steps 2          # a smoke run of the whole pipeline (minutes, meaningless)
#
# Finished runs (OUT/<arm>_seed<N>/eval/results.json) are kept and not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup.sh  # .venv, "${launch[@]}", toy_warm_start
toy=.cache/toy out=${OUT:-outputs/ablations} results=${RESULTS:-RESULTS.md}
seeds=${SEEDS:-1 2 3}
start=$(date +%s)
if [ -z "${WARM_START:-}" ]; then
  toy_warm_start "$toy" outputs/toy_sft
  warm=outputs/toy_sft
else
  .venv/bin/python toy.py --out "$toy"
  warm=$WARM_START
fi
mapfile -t rows < <(grep -E '^\| [A-Za-z-]+ \| `--' README.md)
[ "${#rows[@]}" -eq 8 ] || { echo "error: README.md: expected the 8 rows of the Table 3 table, found ${#rows[@]}" >&2; exit 2; }
mkdir -p "$out"
: > "$out/arms.tsv"
for row in "${rows[@]}"; do
  IFS='|' read -r _ name flags _ <<< "$row"
  name=$(echo "$name" | xargs) flags=$(echo "$flags" | tr -d '`' | xargs)
  printf '%s\t%s\n' "$name" "$flags" >> "$out/arms.tsv"
  for seed in $seeds; do
    run=$out/${name}_seed$seed
    [ -f "$run/eval/results.json" ] && continue
    rm -rf "$run"
    # shellcheck disable=SC2086  # flags holds several flags
    "${launch[@]}" grpo_care.py --toy true --model_path "$warm" --data_root "$toy/data" --output_dir "$run" \
      --seed "$seed" $flags "$@"
    final=$(ls -d "$run"/checkpoint-* | sort -t- -k2 -n | tail -1)
    # shellcheck disable=SC2086
    .venv/bin/python evaluate.py --model_path "$final" --data_root "$toy/data" --toy --max_new_tokens 96 \
      --output_dir "$run/eval" ${EVAL_ARGS:-}
  done
done
.venv/bin/python bench/ablations_table.py "$out" "$seeds" "bench/ablations.sh $*" "$start" "$results"
