#!/usr/bin/env bash
# Frozen vs fine-tuned features, end to end on this machine's CPU, on the 144 shared BACH images, from an
# empty cache: 4 outer folds split by id_block, logistic regression, operating point for sensitivity
# 0.95; with --finetune each backbone is fine-tuned inside every fold. Extra arguments go to both runs
# (e.g. a smaller geometry). Writes metrics.json, config.json and timing.json per run under OUT (the
# report's thumbnails and per-image files of the shared images stay out of the repository).
# Usage: bash benchmarks/finetune_cv_cpu.sh OUT [cv flags...]
set -euo pipefail
OUT=$1; shift
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
for variant in frozen finetuned; do
  CACHE=$(mktemp -d)
  flags=(); [ "$variant" = finetuned ] && flags=(--finetune)
  start=$(date +%s)
  .venv/bin/histoboost cv ../shared/data/bach_iciar2018 --preset quick --split-by id_block --folds 4 \
    --classifier logistic --target-sensitivity 0.95 --compare-split none --cache-dir "$CACHE" \
    --out "$CACHE/run" --quiet "${flags[@]}" "$@"
  seconds=$(( $(date +%s) - start ))
  mkdir -p "$OUT/$variant"
  cp "$CACHE/run/metrics.json" "$CACHE/run/config.json" "$OUT/$variant/"
  printf '{"wall_seconds": %d, "cores": %d, "commit": "%s", "cpu": "%s", "flags": "%s"}\n' "$seconds" "$(nproc)" \
    "$(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)" "$(lscpu | sed -n 's/^Model name: *//p')" \
    "${flags[*]} $*" > "$OUT/$variant/timing.json"
  cat "$OUT/$variant/timing.json"
  rm -rf "$CACHE"
done
