#!/usr/bin/env bash
# Frozen vs fine-tuned features on the 144 BACH images, split by id_block, on a lent CUDA machine, in
# one call of the device tool (about 7 minutes on an H100: 31 s, 135 s and 255 s measured).
# Preparation as in benchmarks/gpu_bench.sh (the wheels in .whl/, the prepared images in .device/bach:
# scaled and Macenko-normalised here, so the runs use --scale 1 --stain none). Writes $OUT/<variant>/
# and $OUT/finetune_gpu.log; keep metrics.json, config.json and the log in benchmarks/results/ (not
# report.html: it embeds thumbnails of the images). SMOKE=1 runs it tiny, on the CPU.
set -uo pipefail
OUT=${OUT:-benchmarks/results/finetune-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/finetune_gpu.log") 2>&1
if [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD/src:/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  DEVICE=cuda; SIZE=(); FT=()
else
  DEVICE=cpu; SIZE=(-A 2 -C 2 --crop-size 128); FT=(--epochs 1 --crops-per-image 1 --finetune-crop-size 128)
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HISTOBOOST_CACHE=/tmp/hb-cache
python3 -c "import torch, timm, xgboost; print('torch', torch.__version__, 'timm', timm.__version__, 'xgboost', xgboost.__version__)"
common=(.device/bach --preset quick --scale 1 --stain none --split-by id_block --folds 4 --classifier logistic
        --target-sensitivity 0.95 --compare-split none --device "$DEVICE" --quiet "${SIZE[@]}")
run() {  # name, time limit, extra flags
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python3 -m histoboost.cli cv "${common[@]}" --out "$OUT/$name" "$@"
  echo "== $name: exit $?, $((SECONDS - start)) s"
}
run frozen 60
run finetuned 200 --finetune "${FT[@]}"
run finetuned-16crops-12epochs 300 --finetune --crops-per-image 16 --epochs 12 --patience 4 "${FT[@]}"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.load(open(run))
    for name, r in m["models"].items():
        op = r.get("operating_point", {})
        print(run.parent.name, name, "acc", r["majority_vote"]["accuracy"], r["majority_vote"]["accuracy_ci"],
              "sens", r["majority_vote"]["binary"]["carcinoma"]["sensitivity"],
              "| op acc", op.get("accuracy"), "sens", op.get("binary", {}).get("carcinoma", {}).get("sensitivity"),
              "spec", op.get("binary", {}).get("carcinoma", {}).get("specificity"))
    for f in m.get("finetuned", []):
        print("  fold", f["fold"], "best", f["best_epoch"], "of", f["epochs_run"], "val", f["best_val_accuracy"],
              "train s", f["seconds"])
PY
