#!/usr/bin/env bash
# Every GPU check and timing in one command, on a CUDA machine where torch and triton import (nothing
# else is needed: no pip, no network; PyTorch 2.11 / Triton 3.6 or newer):
#
#   bash benchmarks/gpu.sh               the whole run, ended by 540 s at the latest
#   bash benchmarks/gpu.sh --quick       a shorter run (fewer cases and repeats, no step 3), by 300 s
#   bash benchmarks/gpu.sh --quick-tune  step 3 with tune_triton.py --quick (also with --quick)
#   bash benchmarks/gpu.sh --regularisers  only zoneout and layer normalisation: step 2's "regular"
#                                        cases, and step 4 as speed.py --regularisers at depth 2
#                                        (float32, bfloat16; two shapes), by 300 s
#   bash benchmarks/gpu.sh --dry-run     its Python steps on CPU at a tiny size, float32, Triton's
#                                        interpreter (results in $OUT, else a temporary directory);
#                                        without Triton installed, steps 2 and 3 are skipped and
#                                        step 4 times the CPU op (backend auto) instead
#
# 1. compile_check.py --quick: every kernel through the real compiler for sm_90, offline;
# 2. gpu_check.py: the Triton kernels against the naive reference (fp32, bf16, fp16; depths 1-3;
#    dense, packed, reverse; activation variants, bias-free levels; CUDA-graph mode; GEMMs by
#    cuBLAS), one process per dtype in parallel with step 1 (compiling is most of their time); its
#    "timed" cases compile the kernels that step 4 times into Triton's cache; beside them,
#    tune_triton.py --compile-only compiles the candidates of step 3;
# 3. tune_triton.py (full run, or --quick-tune): depth-2 microseconds a step of each candidate
#    configuration at the timed shapes (T = 50), each checked against the reference first;
# 4. speed.py per dtype, alone on the GPU: NestedLSTM depth 1-3 on backend triton against cuDNN
#    nn.LSTM with 1-3 layers, the plain per-step loop (torch_loop) at depth 2, and the per-step
#    time split at depth 2, at (B, H, T) = (32, 256, 100), (128, 512, 100), (128, 1024, 100),
#    (256, 1024, 100), (16, 768, 1024); forward and forward+backward, CUDA-event timing; after
#    step 3 with its best configuration at each shape (speed.py --triton-configs);
# 5. memory_graphs.py (on CUDA, where nestrnn's dependencies import): the README's LeakyMemory with
#    the whole layer in CUDA graphs, checked against eager and timed against nn.LSTM.
#
# Results: benchmarks/results/speed_cuda_<dtype>.{json,md} (--regularisers:
# speed_regularisers_cuda_<dtype>.{json,md}), tune_triton_cuda.{json,md},
# memory_graphs_cuda.{json,md} and gpu_run.log (the whole output). With $OUT set (a directory), the
# log is written there and each result file is copied there as soon as it exists. Each step gets a
# timeout within the run's deadline (GPU_SH_SECONDS overrides it); a failing step does not stop the
# others; the exit status is 1 if any failed, 2 without a CUDA device or (but for --dry-run) Triton.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=full
quick_tune=no
for arg in "$@"; do
    case "$arg" in
        --quick-tune) quick_tune=yes ;;
        --quick) mode=quick ;;
        --dry-run) mode=dry-run ;;
        --regularisers) mode=regularisers ;;
        *)
            echo "usage: bash benchmarks/gpu.sh [--quick | --regularisers | --dry-run] [--quick-tune]" >&2
            exit 2
            ;;
    esac
done

python=$(command -v python || command -v python3)
shapes=32x256x100,128x512x100,128x1024x100,256x1024x100,16x768x1024
dtypes="float32 bfloat16 float16"
check_dtypes="fp32 bf16 fp16"
device=cuda
results=benchmarks/results
compile_check=yes
tune=yes
tune_shapes=32x256x50,128x512x50,128x1024x50,256x1024x50,16x768x50
tune_args=(--dtypes bf16,fp16,fp32)
check_args=()
speed_args=(--repeats 11 --budget 15 --plain-loop torch_loop --plain-loop-repeats 2 --split)
speed_name=speed
speed_backend=triton
seconds=540
memory_graphs=yes
if [ "$mode" = quick ]; then
    check_args=(--quick)
    speed_args=(--repeats 5 --budget 6 --plain-loop torch_loop --plain-loop-repeats 1 --split)
    tune=no
    seconds=300
elif [ "$mode" = regularisers ]; then
    check_args=(--groups regular)
    compile_check=no
    tune=no
    memory_graphs=no
    shapes=32x256x100,128x512x100
    dtypes="float32 bfloat16"
    speed_args=(--regularisers --depths 2 --repeats 7 --budget 10)
    speed_name=speed_regularisers
    seconds=300
elif [ "$mode" = dry-run ]; then
    export TRITON_INTERPRET=1
    shapes=3x17x4
    dtypes=float32
    check_dtypes=fp32
    device=cpu
    results=${OUT:-$(mktemp -d)}
    compile_check=no  # tests/test_op_triton.py runs it
    tune_shapes=3x17x4
    tune_args=(--interpret --repeats 1)
    check_args=(--interpret)
    speed_args=(--repeats 1 --plain-loop torch_loop --plain-loop-repeats 1 --split --max-interference 1)
fi
if [ "$quick_tune" = yes ]; then
    tune=yes
    tune_args+=(--quick)
fi
if [ "$mode" != dry-run ]; then
    unset TRITON_INTERPRET
fi
deadline=$((SECONDS + ${GPU_SH_SECONDS:-$seconds}))
mkdir -p "$results"
log="${OUT:-$results}/gpu_run.log"
mkdir -p "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # the log is complete when the script ends
failed=()

limited() {  # run "$@" with a timeout of at most $1 s, cut to the time left before the deadline
    local cap=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -le 10 ]; then
        echo "skipped (no time left before the deadline): $*"
        return 124
    fi
    timeout -k 10 "$((cap < left ? cap : left))" "$@"
}

keep() {  # copy result files into $OUT as soon as they exist
    if [ -n "${OUT:-}" ] && ! [ "$results" -ef "$OUT" ]; then cp "$@" "$OUT"/ || true; fi
}

echo "== gpu.sh $mode, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "nvidia-smi: not available"
"$python" -c "import torch; print('torch', torch.__version__, end=' ')"
if "$python" -c "import triton; print('triton', triton.__version__)" 2>/dev/null; then
    has_triton=yes
else
    has_triton=no
    echo "triton not installed"
fi
if [ "$has_triton" = no ] && [ "$mode" != dry-run ]; then
    echo "the GPU run needs Triton: pip install -e \".[triton]\" (--dry-run runs without it)"
    exit 2
fi
if [ "$has_triton" = no ]; then  # what runs without Triton still runs
    echo "without Triton: steps 2 and 3 are skipped; step 4 times the CPU op (backend auto)"
    check_dtypes=""
    tune=no
    speed_backend=auto
fi
if [ "$device" = cuda ] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device here (bash benchmarks/gpu.sh --dry-run runs the steps on CPU)"
    exit 2
fi

echo "== 1-2. offline compile for sm_90 and the correctness check, in parallel"
tmp=$(mktemp -d)
pids=()
names=()
if [ "$compile_check" = yes ]; then
    limited 150 "$python" benchmarks/compile_check.py --quick > "$tmp/compile_check" 2>&1 &
    pids+=($!)
    names+=(compile_check)
fi
if [ "$tune" = yes ] && [ "$device" = cuda ]; then
    limited 200 "$python" benchmarks/tune_triton.py --compile-only --jobs 6 ${tune_args[@]+"${tune_args[@]}"} \
        --shapes "$tune_shapes" > "$tmp/tune_compile" 2>&1 &
    pids+=($!)
    names+=(tune_compile)
fi
for dt in $check_dtypes; do
    limited 240 "$python" benchmarks/gpu_check.py ${check_args[@]+"${check_args[@]}"} --dtypes "$dt" \
        > "$tmp/gpu_check_$dt" 2>&1 &
    pids+=($!)
    names+=("gpu_check_$dt")
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
    grep -v '^OK ' "$tmp/${names[$i]}"
done
rm -rf "$tmp"
echo "== correctness done after $SECONDS s"

if [ "$tune" = yes ]; then
    echo "== 3. block configurations"
    tuned="$results/tune_triton_${device}.json"
    limited 200 "$python" benchmarks/tune_triton.py ${tune_args[@]+"${tune_args[@]}"} \
        --shapes "$tune_shapes" --json "$tuned" --markdown "$results/tune_triton_${device}.md" ||
        failed+=(tune)
    if [ -f "$tuned" ]; then
        keep "$tuned" "$results/tune_triton_${device}.md"
        speed_args+=(--triton-configs "$tuned")
    fi
    echo "== block configurations done after $SECONDS s"
fi

echo "== 4. timing, one dtype at a time"
for dtype in $dtypes; do
    json="$results/${speed_name}_${device}_$dtype.json"
    markdown="$results/${speed_name}_${device}_$dtype.md"
    limited 200 "$python" benchmarks/speed.py --device "$device" --backend "$speed_backend" \
        --dtype "$dtype" --shapes "$shapes" "${speed_args[@]}" \
        --json "$json" --markdown "$markdown" || failed+=("speed_$dtype")
    if [ -f "$json" ]; then keep "$json" "$markdown"; fi
    echo "== $dtype done after $SECONDS s"
done

if [ "$device" = cuda ] && [ "$memory_graphs" = yes ]; then
    echo "== 5. a user's memory function in CUDA graphs"
    limited 90 "$python" benchmarks/memory_graphs.py --json "$results/memory_graphs_cuda.json" \
        --markdown "$results/memory_graphs_cuda.md" || failed+=(memory_graphs)
    if [ -f "$results/memory_graphs_cuda.json" ]; then
        keep "$results/memory_graphs_cuda.json" "$results/memory_graphs_cuda.md"
    fi
fi

echo "== gpu.sh $mode finished after $SECONDS s; results in $results"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "ALL STEPS PASSED"
