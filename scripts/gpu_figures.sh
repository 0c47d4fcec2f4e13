#!/usr/bin/env bash
# The GPU figures of the training-speed, inference-benchmark, pipeline and TensorRT issues, sized for
# a device budget of about 15 minutes: each part is one device call, and every stage inside it runs
# under the part's deadline (a stage that no longer fits is skipped with a line saying so, one that
# overruns is stopped), so a call always comes back with its tables and logs.
#
# Here, once per session (costs no device time):
#     scripts/gpu_figures.sh prepare      # .carry/mnist (the IDX files) and .whl (spikingjelly, snntorch, loguru)
# Then one device call per part, in the repo root, carry [".carry", ".whl"], timeout_s 590:
#     bash scripts/gpu_figures.sh first           # GPU tests, bench train (every variant, peers, torch.compile), MNIST step time
#     bash scripts/gpu_figures.sh mnist [E [ARGS]] # pipeline on mnist.toml (E epochs), then NeuNorm off, same seed/budget
#     bash scripts/gpu_figures.sh mnist-off [E [ARGS]]  # only the NeuNorm-off training (if mnist ran out of time)
#     bash scripts/gpu_figures.sh infer           # bench: torch, torch-fast (fp32, tf32x2, tf32, bf16), ort-cuda if present,
#                                                 # without CUDA graphs, the per-step layout, ORT CUDA on the tf32x2 and
#                                                 # fp16 exports, torch-compile at the target batch sizes
#     bash scripts/gpu_figures.sh trt             # TensorRT on PYTHONPATH: zoo + trained digits build (and verify where it runs)
#     bash scripts/gpu_figures.sh headline        # when only one call fits: the figures still missing after the
#                                                 # third GPU session, most needed first (see the part's comment)
#     bash scripts/gpu_figures.sh mnist-exact     # pipeline on mnist-exact.toml: issue 8's 99.5 % with 0 flips
# TensorRT-RTX (parses and builds on an H100, cannot run engines there): ../shared/hooks/device-wheels.sh
# trt-rtx here, its three calls back to back, then the trt part while the machine is warm (it lands in
# /tmp/site, which this script puts on PYTHONPATH). ONNX Runtime CUDA likewise: device-wheels.sh ort-gpu.
# `first` prints ms per MNIST training step: an epoch is ~600 steps plus evaluation; choose E so that
# two trainings and the pipeline's export/verify fit the call. ARGS after E go to snncompile as is
# (e.g. --set train.precision=bf16 --set data.augment=shift --set data.augment_pad=2, and
# --set train.channels_last=true if `first` showed the channels_last variant faster).
#
# The next GPU session, in this order (15 minutes of device time, the machine's start included): the
# ort-gpu carry (four calls; ONNX Runtime CUDA rows are "skipped" without it), then `headline` AT ONCE (the
# machine goes back after 30 s idle, and /tmp/ortsite with it: check that the environment line lists
# CUDAExecutionProvider) with DEADLINE = min(what is left minus a minute, 560) -- one command may run 600 s
# at most, timeout_s 590 -- and give_back at the end. (Third session: the four carry calls and a 560 s
# headline left 276 s, enough for one more call of about 120 s before give_back.) (`trt` ran in the second session:
# TensorRT-RTX parses and builds every zoo model and a trained digits model on an H200; it cannot run
# engines there. Rerun it only on a GPU whose compute capability TensorRT-RTX runs, or with full TensorRT.)
#
# Each part writes $OUT/<part>.md (the tables; also printed) and $OUT/<part>.log (stderr, timings).
# DEADLINE=seconds bounds a part (default 560); QUICK=1 shrinks every network, step count and dataset so
# the whole script runs on a CPU as a smoke test.
set -uo pipefail
part=${1:?usage: gpu_figures.sh prepare|first|mnist|mnist-off|mnist-exact|infer|trt|headline [EPOCHS [SNNCOMPILE ARGS]]}
cd "$(dirname "$0")/.."

if [ "$part" = prepare ]; then
    set -e
    mkdir -p .git/info .carry && touch .git/info/exclude
    grep -qxF /.carry/ .git/info/exclude || echo /.carry/ >> .git/info/exclude
    rm -rf .carry/mnist && cp -r "${MNIST_ROOT:-../shared/data/mnist}" .carry/mnist && chmod -R u+w .carry/mnist
    ../shared/hooks/device-wheels.sh py spikingjelly==2.0.0 snntorch==1.0.0 loguru==0.7.3 >/dev/null 2>&1 \
        || { echo "prepare: downloading the wheels failed (../shared/hooks/device-wheels.sh py ...)" >&2; exit 1; }
    du -sh .carry .whl
    exit 0
fi

OUT=${OUT:-export/gpu-figures}
QUICK=${QUICK:-0}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT"
md="$OUT/$part.md"
log="$OUT/$part.log"
# run directories: one place per machine, so a later call (mnist-off, a rerun after a timeout: the
# pipeline resumes per stage) sees the earlier calls' runs while the machine stays warm
if [ "$QUICK" = 1 ]; then runs=$(mktemp -d "${TMPDIR:-/tmp}/gpu-figures-runs.XXXX"); else runs=${RUNS:-/tmp/gpu-figures-runs}; fi
start=$(date +%s)

# The device machine has torch, triton, onnx and onnxruntime but neither snncompile nor the peers:
# carried wheels go to /tmp/site, and `snncompile` runs from this checkout.
if ls .whl/*.whl >/dev/null 2>&1 && ! PYTHONPATH=/tmp/site python3 -c "import spikingjelly, snntorch" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# /tmp/site: the peers, and TensorRT-RTX after device-wheels.sh trt-rtx's calls; /tmp/ortsite: its ort-gpu
for site in /tmp/site /tmp/ortsite; do [ -d $site ] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}; done
if ! command -v snncompile >/dev/null; then
    mkdir -p /tmp/snncompile-bin
    printf '#!/bin/sh\nexec python3 -m snncompile "$@"\n' > /tmp/snncompile-bin/snncompile
    chmod +x /tmp/snncompile-bin/snncompile
    export PATH=/tmp/snncompile-bin:$PATH PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

# stage NAME SECONDS CMD...: run CMD if about SECONDS still fit before the deadline, stopped at the
# deadline; its stdout goes to the tables, its stderr to the log.
stage() {
    local name=$1 need=$2 left t0 rc
    shift 2
    left=$(( DEADLINE - ($(date +%s) - start) ))
    if [ "$left" -lt "$need" ]; then
        echo "skipped $name: $left s left of $DEADLINE s, it needs about $need s" | tee -a "$md"
        return 0
    fi
    echo "== $name, $(date +%T), $left s left" >> "$log"
    t0=$(date +%s)
    timeout --kill-after=10 "$left" "$@" 2>>"$log" | tee -a "$md"
    rc=${PIPESTATUS[0]}
    echo "[$name: exit $rc, $(( $(date +%s) - t0 )) s]" | tee -a "$md"
}

environment() {
    stage environment 5 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
        python3 -c "import torch, triton, onnxruntime as o; print(\"torch\", torch.__version__, \"triton\", triton.__version__,
        \"onnxruntime\", o.__version__, o.get_available_providers())"'
}

if [ "$QUICK" = 1 ]; then
    tiny_cifar=(--set "model.arch='8C3-AP2-8C3-16FC-10'")
    tiny_nmnist=(--set "model.arch='8C3-AP2-8C3-AP2-16FC-10'")
    tiny_voting=(--set "model.arch='8C3(Encoding)-8C3-AP2-16FC-Voting'")
    steps=(--steps 2 --warmup 1 --batch 4)
    batches=1,4
    nmnist_targets=4 cifar_targets=4
    iters=(--iters 3 --warmup 1)
    # 2 epochs: the smoke must reach the stages after the exact MNIST pipeline (30 epochs would eat them)
    mnist_quick=("${tiny_voting[@]}" --set data.limit_train=512 --set data.limit_test=256 --set train.epochs=2)
else
    tiny_cifar=() tiny_nmnist=() tiny_voting=() mnist_quick=()
    steps=(--steps 30 --warmup 10)
    batches=1,64,128
    nmnist_targets=1,128 cifar_targets=64  # the issue's target batch sizes
    iters=(--iters 200 --warmup 20)
fi
mnist_root=$PWD/.carry/mnist
[ -d "$mnist_root" ] || mnist_root=$(cd ../shared/data/mnist 2>/dev/null && pwd)

mnist_summary() {  # [NAME]: accuracy and training wall of every run of models/NAME.toml (mnist), from the runs' own records
    local name=${1:-mnist}
    for run in "$runs/$name"/*/; do
        [ -f "$run/metrics.jsonl" ] || continue
        python3 - "$run" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
t = json.loads((run / "manifest.json").read_text())["training"]
neunorm = "neunorm = true" in (run / "config.toml").read_text()
exact = ", exact arithmetic" if "exact = true" in (run / "config.toml").read_text() else ""
print(f"{run.name}: NeuNorm {'on' if neunorm else 'off'}{exact}, {len(rows)} epochs, test acc "
      f"{100 * rows[-1]['test_acc']:.2f} % (best {100 * max(r['test_acc'] for r in rows):.2f} %), "
      f"train steps {sum(r['train_seconds'] for r in rows):.0f} s, training wall {t['last_session_seconds']:.0f} s "
      f"on {t['device']}; per-epoch test acc {[round(100 * r['test_acc'], 2) for r in rows]}")
PY
        tag=$(grep -q "neunorm = true" "$run/config.toml" && echo on || echo off)
        grep -q "exact = true" "$run/config.toml" && tag=$tag-exact
        cp "$run/metrics.jsonl" "$OUT/$name-$tag-metrics.jsonl"
    done
    # both curves in one PNG (the labels: the config keys the runs differ in)
    ls -d "$runs/$name"/*/ >/dev/null 2>&1 && snncompile plot "$runs/$name"/*/ --out "$OUT/$name-training.png" >&2
}

bench_infer() {  # MODEL COMPILE_BATCHES TINY...: init, export both layouts, bench every GPU runner on them
    local model=$1 compile_batches=$2 run
    shift 2
    run=$(snncompile init "models/$model.toml" "$@" --out "$runs" | sed -E 's/^initialised ([^;]+).*/\1/')
    snncompile export "$run" --samples 64 >&2 && snncompile export "$run" --order step --samples 64 >&2 || return 1
    snncompile bench "$run" --runners torch-fast,ort-cuda,trt,torch-loop --batch "$batches" $iters_s | sed -n '/^model /,/^wrote/p'
    # torch-fast at the other precisions: tf32x2 (fp32-accurate spike layers on TF32 cores), tf32, bf16
    for precision in tf32x2 tf32 bf16; do
        snncompile bench "$run" --runners torch-fast --precision $precision --batch "$batches" $iters_s \
            | sed -n '/^model /,/^wrote/p'
    done
    # what the CUDA graphs save: the same runners launching kernel by kernel
    snncompile bench "$run" --runners torch-fast,ort-cuda --no-cuda-graph --batch "$batches" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    # what cuDNN autotuning saves: torch-fast with cuDNN's heuristic algorithms (the reference's)
    snncompile bench "$run" --runners torch-fast --no-cudnn-autotune --batch "$batches" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    # the per-timestep layout of the same network (the layout other tools export), for comparison
    snncompile bench "$run" --model model_per_step.onnx --runners ort-cuda --batch "$batches" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    # ONNX Runtime CUDA on the split-TF32 graph (fp32-accurate, TF32 on) and on the mixed-precision graph
    # (fp16 convs/linears, fp32 neurons, verified at fp16)
    for precision in tf32x2 fp16; do
        snncompile export "$run" --precision $precision --samples 64 >&2 \
            && snncompile bench "$run" --model model_$precision.onnx --runners ort-cuda --batch "$batches" $iters_s \
            | sed -n '/^model /,/^wrote/p'
    done
    cp "$run/bench.png" "$OUT/$model.png" 2>/dev/null || true  # a call brings back 8 files at most
    # last (compiles per shape, a minute or more each): the per-timestep loop under torch.compile with
    # CUDA graphs, the issue's strongest plain-PyTorch reference, at the target batch sizes
    snncompile bench "$run" --runners torch-compile,torch-fast --batch "$compile_batches" $iters_s \
        | sed -n '/^model /,/^wrote/p'
}

trt_digits() {  # a trained digits model through build and verify at every precision, the step form streamed too
    local run
    snncompile train models/digits.toml --out "$runs" --no-progress | tail -2 | head -1
    run=$(ls -d "$runs"/digits/*/ | tail -1)
    snncompile export "$run" >&2 && snncompile export "$run" --layers >&2 && snncompile export "$run" --form step >&2 \
        || return 1
    for precision in fp32 fp16 bf16; do
        for model in model.onnx model_layers.onnx model_step.onnx; do
            snncompile build "$run" --model "$model" --precision "$precision" --batch 1:32:256 2>&1 | tail -1
        done
        snncompile verify "$run" --runner trt --precision "$precision" --no-progress 2>&1 | tail -3
        snncompile verify "$run" --runner trt --precision "$precision" --model model_step.onnx --no-progress 2>&1 | tail -3
    done
}
infer_targets() {  # MODEL BATCHES TINY...: init, export both layouts, bench the runners that can meet the targets
    local model=$1 batch=$2 run precision
    shift 2
    run=$(snncompile init "models/$model.toml" "$@" --out "$runs" | sed -E 's/^initialised ([^;]+).*/\1/')
    echo "$run" > "$runs/$model.run"  # for the torch-compile stage later in the call
    snncompile export "$run" --samples 64 >&2 && snncompile export "$run" --order step --samples 64 >&2 || return 1
    # not the torch runner: it is the CPU reference (H200 machine: 630 ms per batch of 128, 140 s of a call)
    # torch-loop: the plain per-timestep PyTorch loop on the GPU, the issue's first reference, side by side
    snncompile bench "$run" --runners torch-fast,ort-cuda,torch-loop --batch "$batch" $iters_s | sed -n '/^model /,/^wrote/p'
    cp "$run/bench.png" "$OUT/$model.png" 2>/dev/null || true
    # torch-fast autotunes cuDNN (default since it was added, unmeasured before): the heuristic pick beside it
    snncompile bench "$run" --runners torch-fast --no-cudnn-autotune --batch "$batch" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    snncompile bench "$run" --model model_per_step.onnx --runners ort-cuda --batch "$batch" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    # with TF32 off the targets are below the fp32 arithmetic floor (README): the tensor-core precisions,
    # tf32x2 first (spike-exact, verified at fp32), then tf32 and bf16 with their flips
    for precision in tf32x2 tf32 bf16; do
        snncompile bench "$run" --runners torch-fast --precision $precision --batch "$batch" $iters_s \
            | sed -n '/^model /,/^wrote/p'
    done
    # the same in channels_last (no cuDNN transposes around each conv), and with the input conv, its LIF and
    # pool as one kernel (its output, the largest tensor, never written; new, built without a GPU)
    for precision in tf32x2 bf16; do
        for variant in --channels-last --fuse-input-conv; do
            snncompile bench "$run" --runners torch-fast --precision $precision --batch "$batch" $variant $iters_s \
                | sed -n '/^model /,/^wrote/p'
        done
    done
}

infer_profile() {  # MODEL BATCH TINY...: where torch-fast's (tf32x2, bf16) and ort-cuda's GPU time goes at BATCH
    local model=$1 batch=$2 run precision
    shift 2
    run=$(snncompile init "models/$model.toml" "$@" --out "$runs" | sed -E 's/^initialised ([^;]+).*/\1/')
    snncompile export "$run" --samples 64 >&2 || return 1
    # kernel by kernel (no CUDA graph): a replayed graph hides which kernels its time is made of. tf32x2 is
    # the fp32-accurate precision the issue's fp32 targets can count; bf16 the fastest
    for precision in tf32x2 bf16; do
        snncompile bench "$run" --runners torch-fast --precision $precision --batch "$batch" --no-cuda-graph \
            --profile $iters_s | sed -n '/^model /,/^wrote/p'
    done
    snncompile bench "$run" --runners ort-cuda --batch "$batch" --no-cuda-graph --profile $iters_s \
        | sed -n '/^model /,/^wrote/p'
    # the input conv fused with its LIF and pool (new): profiled, then graphed at both batch sizes, fp32-accurate
    snncompile bench "$run" --runners torch-fast --precision tf32x2 --batch "$batch" --no-cuda-graph --fuse-input-conv \
        --profile $iters_s | sed -n '/^model /,/^wrote/p'
    for variant in "" --fuse-input-conv --channels-last "--fuse-input-conv --channels-last"; do  # "": the baseline
        snncompile bench "$run" --runners torch-fast --precision tf32x2 --batch "1,$batch" $variant $iters_s \
            | sed -n '/^model /,/^wrote/p'
    done
    # the input conv's 2 channels zero-padded to 8 (a tensor-core shape), graphed, against the same unpadded
    snncompile bench "$run" --runners torch-fast --precision bf16 --batch "$batch" --pad-channels 8 --no-cuda-graph \
        --profile $iters_s | sed -n '/^model /,/^wrote/p'
    # bf16, the fastest (fp32 has no tensor-core kernels to gain; tf32x2's variants are above): NCHW,
    # channels_last (no cuDNN transposes around each conv), each without and with the padded input conv
    for precision in bf16; do
        for layout in "" --channels-last; do
            for pad in 1 8; do
                snncompile bench "$run" --runners torch-fast --precision $precision --batch "1,$batch" --pad-channels $pad \
                    $layout $iters_s | sed -n '/^model /,/^wrote/p'
            done
        done
    done
    # (issue 7's layout comparison on ORT CUDA ran on bench-nmnist in the first and third sessions: not repeated)
}

infer_compiled() {  # MODEL BATCHES: the torch.compile reference beside torch-fast, on infer_targets' run
    local run
    run=$(cat "$runs/$1.run") || return 1
    snncompile bench "$run" --runners torch-compile,torch-fast --batch "$2" $iters_s | sed -n '/^model /,/^wrote/p'
}
stream_ort() {  # MODEL BATCHES TINY...: the step form streamed on ORT CUDA, states bound on the GPU vs through the host
    local model=$1 batches=$2 run
    shift 2
    set -o pipefail
    python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        || { echo "ort-cuda: no onnxruntime-gpu, streaming on ORT CUDA skipped"; return 0; }
    run=$(snncompile init "models/$model.toml" "$@" --out "$runs" | sed -E 's/^initialised ([^;]+).*/\1/')
    snncompile export "$run" --samples 64 >&2 && snncompile export "$run" --form step --samples 64 >&2 || return 1
    # one call over T steps against T calls, each verified first (the stream layer by layer)
    snncompile bench "$run" --runners ort-cuda --batch "$batches" $iters_s | sed -n '/^model /,/^wrote/p'
    snncompile bench "$run" --model model_step.onnx --runners ort-cuda --batch "$batches" $iters_s \
        | sed -n '/^model /,/^wrote/p'
    python3 scripts/ort_streaming_binding.py "$run" ort-cuda "$batches" 20
}
split_tf32_ort() {  # TINY...: a NeuNorm MNIST network (every conv analog) through the tf32x2 export on ORT CUDA
    local run
    set -o pipefail  # the stage's exit is verify's, not tail's (bash -c starts without the script's pipefail)
    python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        || { echo "ort-cuda: no onnxruntime-gpu, split TF32 on ORT CUDA skipped"; return 0; }
    run=$(snncompile init models/mnist.toml "$@" --set "data.root='$mnist_root'" --out "$runs" \
        | sed -E 's/^initialised ([^;]+).*/\1/')
    snncompile export "$run" --precision tf32x2 --layers --samples 64 >&2 || return 1
    snncompile verify "$run" --runner ort-cuda --precision tf32x2 --model model_tf32x2_layers.onnx --no-progress 2>&1 | tail -4
}
export -f bench_infer trt_digits infer_targets infer_profile infer_compiled stream_ort split_tf32_ort
export runs batches OUT mnist_root
export iters_s="${iters[*]}"

case "$part" in
first)
    environment
    # the fused kernel compiled for this GPU against pure torch, the graphed training step, torch-fast on CUDA
    stage "GPU tests" 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_bench_train.py tests/test_split_tf32.py \
        tests/test_backends.py -k "not trt"
    stage "split-TF32 accuracy on this GPU" 10 python3 -m pytest -q -s -p no:cacheprovider tests/test_split_tf32.py \
        -k on_the_gpu
    for precision in bf16 fp32; do
        stage "bench train bench-cifar $precision" 30 snncompile bench train models/bench-cifar.toml "${tiny_cifar[@]}" \
            --precision "$precision" --peers "${steps[@]}"
        stage "bench train bench-nmnist $precision" 25 snncompile bench train models/bench-nmnist.toml "${tiny_nmnist[@]}" \
            --precision "$precision" --peers "${steps[@]}"
        stage "bench train mnist $precision" 15 snncompile bench train models/mnist.toml "${tiny_voting[@]}" \
            --precision "$precision" "${steps[@]}"
    done
    # the paper's networks, with NeuNorm and voting, at T = 8
    stage "bench train cifar10 (paper)" 20 snncompile bench train models/cifar10.toml "${tiny_voting[@]}" --T 8 \
        --precision bf16 "${steps[@]}"
    stage "bench train nmnist (paper)" 20 snncompile bench train models/nmnist.toml "${tiny_voting[@]}" --T 8 \
        --precision bf16 "${steps[@]}"
    # the compiled step loop (the issue's strongest plain-PyTorch reference) and ours compiled, beside
    # the uncompiled variants; last, as compiling takes a minute or more
    stage "bench train bench-cifar bf16, torch.compile" 150 snncompile bench train models/bench-cifar.toml \
        "${tiny_cifar[@]}" --precision bf16 --compile "${steps[@]}"
    ;;
mnist | mnist-off)
    # mnist: the whole pipeline (train, export, verify every runner on all 10,000 test images, bench) with
    # NeuNorm, then the same training without NeuNorm (same seed and budget) if it still fits.
    epochs=${2:-30}
    extra=("${@:3}")
    common=("${mnist_quick[@]}" --set "data.root='$mnist_root'" --set "train.epochs=$epochs" "${extra[@]}")
    if [ "$part" = mnist ]; then
        stage "pipeline mnist, NeuNorm on, $epochs epochs" 120 snncompile pipeline models/mnist.toml "${common[@]}" \
            --out "$runs" --batch 1,128 --no-progress
    fi
    stage "train mnist, NeuNorm off, $epochs epochs" 60 snncompile train models/mnist.toml "${common[@]}" \
        --set model.neunorm=false --out "$runs" --no-progress
    mnist_summary | tee -a "$md"
    ;;
infer)
    stage "bench bench-nmnist" 120 bash -c 'bench_infer bench-nmnist "$@"' _ "$nmnist_targets" "${tiny_nmnist[@]}"
    stage "bench bench-cifar" 150 bash -c 'bench_infer bench-cifar "$@"' _ "$cifar_targets" "${tiny_cifar[@]}"
    ;;
headline)
    # One call for when the budget allows no more: the figures still missing after the third GPU session
    # (README, "Measured on a GPU"), the most needed first, so that a call cut short keeps them. Built since,
    # without a GPU, and measured here first: split TF32's analog layers in three accumulators (the GPU test
    # prints the one-accumulator error beside it), the bias gradient summed over T in the LIF backward kernels
    # (the bench train profiles' aten::sum rows), torch-fast --fuse-input-conv (infer_profile, infer_targets), and
    # from the fourth CPU session: the input conv fused in training too (bench train's two "input conv fused"
    # variants, the NCHW one profiled), its kernel retiled (channels x positions per program), and the bf16 LIF
    # backward recomputing the membrane in its own registers (the profiles' lif_forward calls per step should
    # halve: no recompute launches left in backward); from the fifth: our variants' SGD update as torch's fused
    # kernel (the profiles' Optimizer.step row, 419 us per bench-cifar step on the H200 with the default update;
    # the line under each table times the update alone both ways) and the "spikes saved unpacked" twins in
    # place of the padded ones (no uint8 packing copies: the profiles' aten::copy_ rows), and NeuNorm's kernels
    # (the paper CIFAR10 net's stage). Stage
    # lengths measured on the H200: machine start 29 s, ort-gpu's four carry calls 26 s, GPU tests 70 s with
    # -n 4, a bench train 19-26 s with --profile, bench-cifar's two 180 MB exports 19 and 15 s.
    # (The exact MNIST pipeline, issue 8's criterion, ran in the third session: `mnist-exact` below.)
    environment
    xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)
    # the split-TF32 test now prints every error before asserting (its analog half failed on the H200),
    # the channels-last pooled forward's one-warp launch, and the GPU-only tests. Capped: a hang must not
    # cost the figures after it. -v into the log (appended: `tee /dev/stderr` would truncate it), and to the
    # tables the failures, the split-TF32 errors and the summary, or, when the cap stops the run, how far it got
    stage "GPU tests" 60 bash -c 'f=$(mktemp); timeout 150 python3 -m pytest -v -rA -p no:cacheprovider "$@" 2>&1 \
        | tee "$f" >&2; rc=${PIPESTATUS[0]}; grep -E "FAILED|ERROR|max error vs float64|^=+ .*(passed|failed|error)" "$f"
        [ "$rc" = 124 ] && echo "stopped by the 150 s cap after $(grep -cE " (PASSED|FAILED|SKIPPED|ERROR)" "$f") results"
        rm -f "$f"; exit "$rc"' _ "${xdist[@]}" tests/test_kernels.py tests/test_input_conv.py \
        tests/test_bench_train.py tests/test_backends.py tests/test_exact.py tests/test_split_tf32.py tests/test_streaming.py \
        tests/test_train.py::test_on_the_gpu_a_resumed_adam_keeps_its_step_counts_where_its_kernel_wants_them -k "not trt and \
        (cuda or gpu or compact_spikes or exact_on_cpu or bf16_flips or opt_in or replays or autotuning or \
        half_precision or pooled_spikes or lif_pool or pool_fused or zoo_networks_fused or contraction or \
        bit_for_bit or moves_each or hand_their_bias or nan_gradient or keeps_no_membrane or past_32x32 or one_warp or \
        input_conv or strided_input or unfused_path or truncating or per_channel or fused_neunorm)"
    # issue 6: bench-cifar's bf16 step, 9.9 ms at best (channels_last) against 8.5, where the fused LIF + pool
    # forward took 830-900 us per call in channels_last (6.75x NCHW on bench-nmnist); it now runs one warp per program.
    # --profile shows whether that kernel is now as fast as in NCHW
    stage "bench train bench-cifar bf16" 45 snncompile bench train models/bench-cifar.toml "${tiny_cifar[@]}" \
        --precision bf16 --profile --plot "$OUT/train-bench-cifar-bf16.png" "${steps[@]}"
    stage "bench train bench-nmnist bf16" 32 snncompile bench train models/bench-nmnist.toml "${tiny_nmnist[@]}" \
        --precision bf16 --profile --plot "$OUT/train-bench-nmnist-bf16.png" "${steps[@]}"
    # the split TF32 of analog layers on ONNX Runtime CUDA (TF32 session-wide): verify at the fp32 preset on a
    # NeuNorm network, whose every conv is analog, calibrated so that every layer spikes
    stage "split TF32 on ORT CUDA, NeuNorm network" 60 bash -c 'split_tf32_ort "$@"' _ "${tiny_voting[@]}"
    # issue 7's missed target (bench-nmnist b128: 1.7 ms at best, target 1.0): which kernels the time is in, and
    # the fused input conv (its 606 MB output never written); small exports, so before bench-cifar's
    stage "profile bench-nmnist inference" 100 bash -c 'infer_profile bench-nmnist "$@"' _ "${nmnist_targets##*,}" \
        "${tiny_nmnist[@]}"
    # issue 7's streaming on ORT CUDA (built without a GPU): model_step.onnx's T calls with the states bound on the
    # GPU (one CUDA graph per call) against model.onnx's one call, and against the states through the host
    stage "stream bench-nmnist on ORT CUDA" 45 bash -c 'stream_ort bench-nmnist "$@"' _ "1,${nmnist_targets##*,}" \
        "${tiny_nmnist[@]}"
    # issue 6's paper networks: the CIFAR10 net's step took 21.6 ms on the H200 against bench-cifar's 10.5 with the
    # same convs; NeuNorm's full-size passes now run as three kernels (neunorm_* in the profile)
    stage "bench train cifar10 (paper) bf16" 30 snncompile bench train models/cifar10.toml "${tiny_voting[@]}" --T 8 \
        --precision bf16 --profile "${steps[@]}"
    # issue 7: bench-cifar inference at the target batch (its exports alone took the third session's stage)
    stage "bench bench-cifar" 200 bash -c 'infer_targets bench-cifar "$@"' _ "$cifar_targets" "${tiny_cifar[@]}"
    # the plain-PyTorch references compiled (minutes of compiling each)
    stage "bench bench-cifar, torch.compile" 60 bash -c 'infer_compiled bench-cifar "$@"' _ "$cifar_targets"
    stage "bench train bench-cifar bf16, torch.compile" 150 snncompile bench train models/bench-cifar.toml \
        "${tiny_cifar[@]}" --precision bf16 --compile "${steps[@]}"
    ;;
mnist-exact)
    # issue 8's criterion: MNIST >= 99.5 % and zero flips on ONNX Runtime CPU on all 10,000 test images, which
    # exact arithmetic gives by construction (third session, H200: 99.53 %, 214 s of training wall, 338 s in all)
    stage "pipeline mnist-exact" 280 timeout 450 snncompile pipeline models/mnist-exact.toml "${mnist_quick[@]}" \
        --set "data.root='$mnist_root'" --out "$runs" --batch 1,128 --no-progress
    mnist_summary mnist-exact | tee -a "$md"
    ;;
trt)
    stage "TensorRT tests" 120 python3 -m pytest -q -p no:cacheprovider -m trt tests/test_trt.py
    stage "TensorRT trained digits" 120 bash -c trt_digits
    ;;
*)
    echo "unknown part $part (prepare|first|mnist|mnist-off|mnist-exact|infer|trt|headline)" >&2
    exit 2
    ;;
esac
echo "$part: $(( $(date +%s) - start )) s of $DEADLINE s" | tee -a "$md"
