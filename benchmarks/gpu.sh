#!/usr/bin/env bash
# Every GPU check and timing in one command, on a CUDA machine with torch and triton:
#   bash benchmarks/gpu.sh            (results in benchmarks/results/speed_cuda_*.{json,md})
# 1. the Triton kernels against the naive reference on the real compiler (stops on any failure);
# 2. NestedLSTM depth 1-3 (Triton backend) against cuDNN nn.LSTM with 1-3 layers, per dtype, at the
#    shapes of the Triton issue, forward and forward+backward, device-event timing, one process each;
# 3. the plain per-step PyTorch loop at depth 2, for the "10x faster than the plain loop" goal.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=benchmarks/results
shapes=32x256x100,128x512x100,128x1024x100,256x1024x100,16x768x1024
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python benchmarks/gpu_check.py
for dtype in float32 bfloat16 float16; do
    python benchmarks/speed.py --device cuda --backend triton --dtype "$dtype" --shapes "$shapes" \
        --repeats 11 --json "$out/speed_cuda_$dtype.json" --markdown "$out/speed_cuda_$dtype.md"
done
python benchmarks/speed.py --device cuda --backend naive --dtype float32 --depths 2 \
    --shapes "$shapes" --repeats 3 --json "$out/speed_cuda_naive_float32.json" \
    --markdown "$out/speed_cuda_naive_float32.md"
