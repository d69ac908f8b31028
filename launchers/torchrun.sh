#!/usr/bin/env bash
# Run an scdd stage on one node with NPROC processes (one per GPU), via torchrun.
#
#   launchers/torchrun.sh stage=squeeze data=imagefolder data.root=/data/imagenet
#   NPROC=4 MASTER_PORT=29600 launchers/torchrun.sh stage=pipeline
#
# Environment:
#   NPROC        processes on this node (default: visible GPUs, or 1 without a GPU)
#   MASTER_PORT  rendezvous port on localhost (default 29500; pick another per concurrent job)
#   PYTHON       interpreter (default: .venv/bin/python of this checkout if present, else python3)
# Every argument is forwarded to `python -m engine.cli` as Hydra overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  --master_port="${MASTER_PORT:-29500}" -m engine.cli "$@"
