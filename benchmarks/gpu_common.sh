# Sourced by the GPU measurement scripts (gpu_recover.sh, gpu_students.sh): their environment and step runner.
# Every step writes $OUT/<step>.log (stdout + stderr); each step's exit code and seconds go to $OUT/summary.txt,
# and a failed or timed-out step does not stop the next. ONLY=<part>[,<part>...] runs just the steps whose name
# contains one of the parts (ONLY=01,03: steps 01_* and 03_*).
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.gpu/pydeps
export TRITON_INTERPRET=0
PY=${PY:-python3}
ONLY=${ONLY:-}
STEP_TAIL=${STEP_TAIL:-40}  # lines of each step's log echoed to the console

selected() {  # selected NAME: whether ONLY lets step NAME run
    [ -z "$ONLY" ] && return 0
    local part
    for part in ${ONLY//,/ }; do
        [[ "$1" == *"$part"* ]] && return 0
    done
    return 1
}

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    local start=$SECONDS
    echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.txt"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc ($((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
    tail -n "$STEP_TAIL" "$OUT/$name.log"
}

device_step() {  # device_step MODULE...: GPU name, memory, driver; torch/triton versions; which modules import
    local modules="$*"
    step 00_device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
      $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; \
      for m in $modules; do \
        $PY -c \"import \$m\" 2>/dev/null && echo \"import \$m: ok\" || echo \"import \$m: MISSING\"; done"
}
