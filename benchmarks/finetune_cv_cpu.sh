#!/usr/bin/env bash
# The whole `cv --finetune` on the 144 shared BACH images, on this machine's CPU, from an empty cache:
# fine-tuning inside each of 4 outer folds split by id_block, extraction with each fold's weights,
# logistic regression, operating point for sensitivity 0.95. Writes the run folder and a timing JSON.
# Usage: bash benchmarks/finetune_cv_cpu.sh [OUT]   (about 2 hours on the project's 2-core VM)
set -euo pipefail
OUT=${1:-benchmarks/results/$(date +%F)-cpu-finetune-cv}
CACHE=$(mktemp -d)
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
start=$(date +%s)
.venv/bin/histoboost cv ../shared/data/bach_iciar2018 --preset quick --split-by id_block --folds 4 \
  --classifier logistic --target-sensitivity 0.95 --finetune --cache-dir "$CACHE" --out "$OUT" --quiet
seconds=$(( $(date +%s) - start ))
rm -f "$OUT"/cv_results.npz "$OUT"/predictions.csv  # per-image details stay local; metrics.json has the results
printf '{"wall_seconds": %d, "cores": %d, "commit": "%s", "cpu": "%s"}\n' "$seconds" "$(nproc)" \
  "$(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)" "$(lscpu | sed -n 's/^Model name: *//p')" \
  > "$OUT/timing.json"
cat "$OUT/timing.json"
rm -rf "$CACHE"
