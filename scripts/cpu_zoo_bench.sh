#!/usr/bin/env bash
# torch vs ONNX Runtime vs OpenVINO on the CPU for every zoo model at full width (untrained, calibrated so
# every layer fires), batch 1 and 32, side by side in one bench per model (a runner not installed is skipped
# with its reason). Usage: scripts/cpu_zoo_bench.sh [OUT_DIR]   (prints one table per model)
set -euo pipefail
out=${1:-export/cpu-zoo-bench}
for toml in models/*.toml; do
    run=$(snncompile init "$toml" --out "$out" | sed -E 's/^initialised ([^;]+).*/\1/')
    snncompile export "$run" --samples 32 > /dev/null
    snncompile bench "$run" --runners torch,ort-cpu,ov-cpu --batch 1,32 --iters 10 --warmup 2 | sed -n '/^model /,/^wrote/p'
done
