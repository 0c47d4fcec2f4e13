#!/usr/bin/env bash
# The GPU figures of the training-speed, inference-benchmark and pipeline issues, one part per call
# (a device call may run 10 minutes). Each part appends its tables to $OUT/<part>.md and its logs to
# $OUT/<part>.log, and prints the tables at the end.
#
#   OUT=$OUT scripts/gpu_figures.sh train      # bench train: bench-cifar/bench-nmnist fp32+bf16, peers; paper nets T=8
#   OUT=$OUT scripts/gpu_figures.sh trt        # TensorRT on PYTHONPATH: zoo + trained digits build (and verify where it runs)
#   OUT=$OUT scripts/gpu_figures.sh infer      # bench: torch, torch-fast, ort-cuda, trt at b1/b64/b128; per-step layout on ORT CUDA
#   OUT=$OUT MNIST_ROOT=dir scripts/gpu_figures.sh mnist [EPOCHS [ARGS]]       # pipeline on mnist.toml
#   OUT=$OUT MNIST_ROOT=dir scripts/gpu_figures.sh mnist-off [EPOCHS [ARGS]]   # the same training, NeuNorm off
#
# QUICK=1 shrinks every network and step count so the whole script runs on a CPU as a smoke test.
set -euo pipefail
part=${1:?usage: gpu_figures.sh train|infer|trt|mnist|mnist-off [EPOCHS [SNNCOMPILE ARGS]]}
OUT=${OUT:-export/gpu-figures}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
md="$OUT/$part.md"
log="$OUT/$part.log"
runs="$OUT/runs"

if [ "$QUICK" = 1 ]; then
    tiny_cifar=(--set "model.arch='8C3-AP2-8C3-16FC-10'")
    tiny_nmnist=(--set "model.arch='8C3-AP2-8C3-AP2-16FC-10'")
    tiny_voting=(--set "model.arch='8C3(Encoding)-8C3-AP2-16FC-Voting'")
    steps=(--steps 2 --warmup 1 --batch 4 --device cpu)
    batches=1,4
    iters=(--iters 3 --warmup 1)
else
    tiny_cifar=() tiny_nmnist=() tiny_voting=()
    steps=(--steps 30 --warmup 10)
    batches=1,64,128
    iters=(--iters 200 --warmup 20)
fi

case "$part" in
train)
    for precision in bf16 fp32; do
        snncompile bench train models/bench-cifar.toml "${tiny_cifar[@]}" --precision "$precision" --peers "${steps[@]}" 2>>"$log" | tee -a "$md"
        snncompile bench train models/bench-nmnist.toml "${tiny_nmnist[@]}" --precision "$precision" --peers "${steps[@]}" 2>>"$log" | tee -a "$md"
    done
    # the paper's networks, with NeuNorm and voting, at T = 8
    snncompile bench train models/cifar10.toml "${tiny_voting[@]}" --T 8 --precision bf16 "${steps[@]}" 2>>"$log" | tee -a "$md"
    snncompile bench train models/nmnist.toml "${tiny_voting[@]}" --T 8 --precision bf16 "${steps[@]}" 2>>"$log" | tee -a "$md"
    ;;
infer)
    for model in bench-nmnist bench-cifar; do
        tiny=(); [ "$model" = bench-cifar ] && tiny=("${tiny_cifar[@]}") || tiny=("${tiny_nmnist[@]}")
        run=$(snncompile init "models/$model.toml" "${tiny[@]}" --out "$runs" 2>>"$log" | sed -E 's/^initialised ([^;]+).*/\1/')
        snncompile export "$run" --samples 64 >>"$log" 2>&1
        snncompile export "$run" --order step --samples 64 >>"$log" 2>&1
        snncompile bench "$run" --runners torch,torch-fast,ort-cuda,trt --batch "$batches" "${iters[@]}" 2>>"$log" \
            | sed -n '/^model /,/^wrote/p' | tee -a "$md"
        snncompile bench "$run" --batch "$batches" "${iters[@]}" --precision bf16 --runners torch-fast 2>>"$log" \
            | sed -n '/^model /,/^wrote/p' | tee -a "$md"
        # ONNX Runtime CUDA on the mixed-precision graph (fp16 convs/linears, fp32 neurons), verified at fp16
        snncompile export "$run" --precision fp16 --samples 64 >>"$log" 2>&1
        snncompile bench "$run" --model model_fp16.onnx --runners ort-cuda --batch "$batches" "${iters[@]}" 2>>"$log" \
            | sed -n '/^model /,/^wrote/p' | tee -a "$md"
        # the per-timestep layout of the same network (the layout other tools export), for comparison
        snncompile bench "$run" --model model_per_step.onnx --runners ort-cuda,torch --batch "$batches" "${iters[@]}" 2>>"$log" \
            | sed -n '/^model /,/^wrote/p' | tee -a "$md"
    done
    ;;
trt)
    # TensorRT (or TensorRT-RTX, on PYTHONPATH): every tiny zoo model and a trained digits model parse and
    # build strongly typed at fp32/fp16/bf16; where the runtime supports this GPU, verify the engines too.
    python -m pytest -q -m trt tests/test_trt.py 2>&1 | tail -25 | tee -a "$md"
    snncompile train models/digits.toml --out "$runs" --no-progress 2>>"$log" | tail -2 | head -1 | tee -a "$md"
    run=$(ls -d "$runs"/digits/*/ | tail -1)
    snncompile export "$run" >>"$log" 2>&1 && snncompile export "$run" --layers >>"$log" 2>&1
    for precision in fp32 fp16 bf16; do
        for model in model.onnx model_layers.onnx; do
            snncompile build "$run" --model "$model" --precision "$precision" --batch 1:32:256 2>&1 | tail -1 | tee -a "$md"
        done
        snncompile verify "$run" --runner trt --precision "$precision" --no-progress 2>&1 | tail -3 | tee -a "$md"
    done
    ;;
mnist | mnist-off)
    # mnist: the whole pipeline (train, export, verify every runner on all 10,000 test images, bench) with
    # NeuNorm; mnist-off: the same training without NeuNorm (same seed and budget), training only. Two
    # parts because each must fit one 10-minute call. Extra arguments after EPOCHS go to snncompile as is
    # (e.g. --set data.augment=shift --set data.augment_pad=2).
    epochs=${2:-30}
    extra=("${@:3}")
    root=${MNIST_ROOT:-../shared/data/mnist}
    quick=(); [ "$QUICK" = 1 ] && quick=("${tiny_voting[@]}" --set data.limit_train=512 --set data.limit_test=256)
    start=$(date +%s)
    if [ "$part" = mnist ]; then
        snncompile pipeline models/mnist.toml "${quick[@]}" --set "data.root='$root'" --set "train.epochs=$epochs" \
            "${extra[@]}" --out "$runs" --batch 1,128 --no-progress 2>>"$log" | tee -a "$md"
    else
        snncompile train models/mnist.toml "${quick[@]}" --set "data.root='$root'" --set "train.epochs=$epochs" \
            --set model.neunorm=false "${extra[@]}" --out "$runs" --no-progress 2>>"$log" | tee -a "$md"
    fi
    # training wall (with per-epoch evaluation) and accuracy, from the runs' own records (a pipeline's
    # wall also counts export, verify and bench)
    for run in "$runs"/mnist/*/; do
        python - "$run" <<'PY' | tee -a "$md"
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
t = json.loads((run / "manifest.json").read_text())["training"]
neunorm = "neunorm = true" in (run / "config.toml").read_text()
print(f"{run.name}: NeuNorm {'on' if neunorm else 'off'}, {len(rows)} epochs, test acc "
      f"{100 * rows[-1]['test_acc']:.2f} % (best {100 * max(r['test_acc'] for r in rows):.2f} %), "
      f"train steps {sum(r['train_seconds'] for r in rows):.0f} s, training wall {t['last_session_seconds']:.0f} s on {t['device']}")
PY
    done
    echo "$part: wall $(( $(date +%s) - start )) s" | tee -a "$md"
    ;;
*)
    echo "unknown part $part (train|infer|trt|mnist|mnist-off)" >&2
    exit 2
    ;;
esac
