#!/usr/bin/env bash
# One-command GPU acceptance and benchmarks (issue 11). On a bare GPU machine (Python 3.12, torch,
# triton, transformers, peft, pytest; no diffusers/open_clip, no internet), with the wheelhouse of
# bench/gpu/wheels.sh carried as .whl/:
#
#   bash bench/gpu/run.sh --out DIR                      # every stage
#   bash bench/gpu/run.sh --out DIR --stage rollout      # one stage (setup is redone, cheaply)
#   bash bench/gpu/run.sh --out DIR --device cpu --tiny  # every stage on tiny models on CPU (CI)
#
# Steps: install the wheels and g2rpo (with the CUDA op, sm_90) into DIR/site, run the tests marked
# `gpu` (tests/test_gpu.py and friends), run each stage (bench/gpu/acceptance.py) in its own process under its own timeout, then write
# DIR/report.json and DIR/report.md. Exit status: 0 when every step ran ok.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="" STAGE="all" DEVICE="cuda" TINY="" STAGE_TIMEOUT="${G2RPO_STAGE_TIMEOUT:-540}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --stage) STAGE="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --tiny) TINY="--tiny"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "run.sh: --out DIR is required" >&2; exit 2; }
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac
STAGES="rollout graphs ops train_step ratio memory"
if [ "$STAGE" != all ]; then
    case " $STAGES " in *" $STAGE "*) STAGES="$STAGE" ;; *) echo "run.sh: unknown stage $STAGE ($STAGES)" >&2; exit 2 ;; esac
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log() { echo "[run.sh $(date +%H:%M:%S)] $*"; }
status=0
setup_wheels="skipped: --device cpu uses this environment" setup_build="skipped: --device cpu uses this environment"
setup_tests="skipped"

if [ "$DEVICE" = cuda ]; then
    SITE="$OUT/site"
    mkdir -p "$SITE"
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        log "installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels into $SITE"
        if timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$ROOT"/.whl/*.whl; then setup_wheels="ok"; else setup_wheels="failed"; status=1; fi
    else
        setup_wheels="no .whl/ wheelhouse (run bench/gpu/wheels.sh here and carry .whl)"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "building g2rpo with the CUDA op (sm_90) into $SITE"
    if (cd "$ROOT" && G2RPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 540 "$PY" -m pip install -q \
            --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .); then
        setup_build=$("$PY" -c "import g2rpo.ops as o; print('ok, backends ' + ','.join(o.available_backends()))" 2>&1 | tail -1)
    else
        setup_build="failed"; status=1
    fi
    # tests marked gpu, run from outside the checkout so that the installed g2rpo is imported
    log "tests marked gpu"
    # tests/ only: bench/'s GPU benchmarks are what the stages below measure, with timeouts of their own;
    # real Triton kernels, not the interpreter the CPU test session sets up
    export TRITON_INTERPRET=0
    if (cd "$OUT" && timeout 540 "$PY" -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -m gpu -q \
            -p no:cacheprovider "$ROOT/tests" > "$OUT/gpu_tests.log" 2>&1); then
        setup_tests="ok: $(tail -1 "$OUT/gpu_tests.log")"
    else
        setup_tests="FAILED: $(tail -1 "$OUT/gpu_tests.log")"; status=1
    fi
    log "$setup_tests"
    RUN_DIR="$OUT"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$ROOT"
fi
"$PY" - "$OUT/setup.json" "$setup_wheels" "$setup_build" "$setup_tests" "$DEVICE" "$TINY" <<'PYEOF'
import json, sys, torch
out, wheels, build, tests, device, tiny = sys.argv[1:]
name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
json.dump({"device": name, "torch": torch.__version__, "mode": "tiny" if tiny else "full",
           "wheels": wheels, "cuda_op_build": build, "gpu_tests": tests}, open(out, "w"), indent=1)
PYEOF

for s in $STAGES; do
    log "stage $s (timeout ${STAGE_TIMEOUT}s)"
    rm -f "$OUT/stage_$s.json"
    (cd "$RUN_DIR" && timeout -k 10 "$STAGE_TIMEOUT" "$PY" "$ROOT/bench/gpu/acceptance.py" --stage "$s" \
        --device "$DEVICE" $TINY --out "$OUT")
    rc=$?
    if [ $rc -ne 0 ]; then
        status=1
        if [ ! -f "$OUT/stage_$s.json" ]; then
            echo "{\"status\": \"failed\", \"error\": \"exit $rc (124: timed out after ${STAGE_TIMEOUT}s)\"}" > "$OUT/stage_$s.json"
        fi
    fi
done
"$PY" "$ROOT/bench/gpu/acceptance.py" --report --out "$OUT" || status=1
log "report: $OUT/report.md (exit $status)"
exit $status
