#!/usr/bin/env bash
# Run an scdd stage with the DeepSpeed trainer on one node (torchrun starts the processes).
#
#   launchers/deepspeed.sh stage=squeeze
#   NPROC=8 DS_CONFIG=zero2 launchers/deepspeed.sh stage=squeeze data=imagefolder data.root=/data/in1k
#
# Environment:
#   DS_CONFIG    DeepSpeed config choice, passed as `deepspeed=$DS_CONFIG` (default zero1); a name
#                of the deepspeed= group (zero0|zero1|zero2) or, when it ends in .json, a path passed as deepspeed.path
#   NPROC, MASTER_PORT, PYTHON   as in launchers/torchrun.sh
# Every argument is forwarded to engine.cli after `trainer=deepspeed`. Later arguments win, so
# `trainer=...` on the command line overrides this wrapper's choice.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DS_CONFIG="${DS_CONFIG:-zero1}"
if [[ "$DS_CONFIG" == *.json ]]; then
  DS_ARG="deepspeed.path=$DS_CONFIG"
else
  DS_ARG="deepspeed=$DS_CONFIG"
fi
exec "$HERE/torchrun.sh" trainer=deepspeed "$DS_ARG" "$@"
