#!/usr/bin/env bash
# Issue 14 on one GPU (H100 / H200), in about 6 minutes (every step has its own timeout; 9 min at most).
#
# Run from the repository root, e.g. through the device tool:
#     bash benchmarks/gpu_recover.sh
# The GPU box has torch, triton and torchvision; the benches also import numpy, PIL and tqdm, and
# the pytest step needs pytest, hydra and omegaconf: whatever of these the box lacks goes into
# .gpu/pydeps (00_device.log lists what is importable). Every step writes $OUT/<step>.log (stdout + stderr), and
# JSON where it has some; a failed or timed-out step is recorded in $OUT/summary.txt and the next runs.
#
# What it prints (and keeps under $OUT):
#   00_device.log        GPU name, memory, driver; torch/triton versions; which Python deps import
#   01_recover_r18.log   recover rows, ResNet-18 224 px, class-batch 100: peer loop, floor (teacher
#                        forward + input backward) and this engine at G = 1,2,4,8 class-batches per
#                        step, fp32/bf16, CUDA graphs off/on; img-it/s, ratio vs peer, peak MB, best G
#                                                                                      + .json
#   02_recover_r50.log   the same for ResNet-50, class-batch 50                                + .json
#   03_bf16_vs_fp32.log  CE and BN loss every 5 of 50 recover steps, fp32 and bf16 side by side from
#                        the same start (ResNet-18 224 px, batch 100), largest relative differences,
#                        relative L2 of the final images                                     + .json
#   04_kernels.log       the fused BN module (BN output + matching loss, forward + backward) per
#                        backend (triton, torch) against the unfused path, G = 1 and 4, every
#                        BN-input shape of ResNet-18/50 at 224 px and CIFAR ResNet-18 at 32 px + .json
#   05_pytest_gpu.log    pytest -m gpu on the recover/kernel/augment files of tests/gpu
#   06_bn_layers.log     per BN layer inside the real recover loop (ResNet-18, 224 px, batch 100, fp32,
#                        G=1, eager): its launches and device time, forward and backward      + .json
#   summary.txt          each step's exit code and seconds
# ONLY=<step name part> runs just the matching steps (a rerun of one that failed).
source "$(dirname "$0")/gpu_common.sh"  # OUT, PY, ONLY, step, device_step

device_step numpy PIL tqdm torchvision pytest hydra omegaconf

step 01_recover_r18 130 $PY -m engine.bench.recover_cli --model resnet18 --image-size 224 --batch 100 \
  --groups 1,2,4,8 --precisions fp32,bf16 --graphs off,on --steps 5 --warmup 2 --repeats 1 \
  --json "$OUT/01_recover_r18.json"

step 02_recover_r50 150 $PY -m engine.bench.recover_cli --model resnet50 --image-size 224 --batch 50 \
  --groups 1,2,4,8 --precisions fp32,bf16 --graphs off,on --steps 4 --warmup 2 --repeats 1 \
  --json "$OUT/02_recover_r50.json"

step 03_bf16_vs_fp32 60 $PY -m engine.bench.gpu_checks --model resnet18 --image-size 224 --batch 100 \
  --steps 50 --every 5 --json "$OUT/03_bf16_vs_fp32.json"

step 04_kernels 60 $PY -m kernels.bench --what module --shapes all --batch 100 --groups 1,4 --iters 10 \
  --channels-last --json "$OUT/04_kernels.json"

GPU_TESTS=$(ls tests/gpu/test_augment*_cuda.py tests/gpu/test_kernels*_cuda.py tests/gpu/test_fused_bn*_cuda.py \
  tests/gpu/test_group*_cuda.py tests/gpu/test_recover*_cuda.py tests/gpu/test_graph*_cuda.py \
  tests/gpu/test_precision*_cuda.py 2>/dev/null)
step 05_pytest_gpu 120 $PY -m pytest -m gpu -x -q -p no:cacheprovider $GPU_TESTS

step 06_bn_layers 60 $PY -m engine.bench.bn_layers --model resnet18 --image-size 224 --batch 100 --groups 1 \
  --precision fp32 --steps 5 --json "$OUT/06_bn_layers.json"

echo "done in $SECONDS s; logs in $OUT" | tee -a "$OUT/summary.txt"
