#!/usr/bin/env bash
# One-command GPU acceptance and benchmarks (issues 11, 22). On a bare GPU machine (Python 3.12, torch, triton,
# transformers, peft, pytest; no diffusers/open_clip, no internet), with the wheelhouse of bench/gpu/wheels.sh
# carried as .whl/:
#
#   bash bench/gpu/run.sh --out DIR                         # every stage within --budget-s (default 480 s)
#   bash bench/gpu/run.sh --out DIR --stage rollout         # one stage (setup is redone, cheaply)
#   bash bench/gpu/run.sh --out DIR --device cpu --tiny     # every stage on tiny models on CPU (CI)
#   options: --budget-s N (the whole run, setup included), --work DIR (installs, logs; default a temp dir)
#
# Steps: install the wheels and g2rpo (with the CUDA op, sm_90) into the work dir, run the tests marked `gpu`,
# run the stages in order of value (ops, rollout, ratio, train_step, memory, graphs), each in its own process
# under its share of what is left of the budget, then write the report for what ran. DIR receives at most 4
# files: report.json, report.md, gpu_tests.log and details.tar.gz (stage JSONs, setup, stage logs).
# Exit status: 0 when every step that ran was ok.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="" STAGE="all" DEVICE="cuda" TINY="" BUDGET=480 WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --stage) STAGE="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --tiny) TINY="--tiny"; shift ;;
        --budget-s) BUDGET="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "run.sh: --out DIR is required" >&2; exit 2; }
case "$DEVICE" in cuda|cpu) ;; *) echo "run.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "run.sh: --budget-s must be a whole number of seconds" >&2; exit 2 ;; esac
[ "$BUDGET" -ge 20 ] || { echo "run.sh: --budget-s must be >= 20" >&2; exit 2; }
STAGES="ops rollout ratio train_step memory graphs"   # in order of value
declare -A WEIGHT=([ops]=3 [rollout]=4 [ratio]=2 [train_step]=3 [memory]=2 [graphs]=2)
if [ "$STAGE" != all ]; then
    case " $STAGES " in *" $STAGE "*) STAGES="$STAGE" ;; *) echo "run.sh: unknown stage $STAGE ($STAGES)" >&2; exit 2 ;; esac
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET - 5))   # 5 s kept for the report and the tarball
left() { echo $((DEADLINE - $(date +%s))); }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ -n "$WORK" ] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/g2rpo_gpu.XXXXXX")"
mkdir -p "$WORK/stages"
WORK="$(cd "$WORK" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log() { echo "[run.sh $(date +%H:%M:%S) $(left)s left] $*"; }
status=0
setup_wheels="skipped: --device cpu uses this environment" setup_build="skipped: --device cpu uses this environment"
setup_tests="skipped"
: > "$OUT/gpu_tests.log"

if [ "$DEVICE" = cuda ]; then
    SITE="$WORK/site"   # never inside --out: nothing installed is sent back
    mkdir -p "$SITE"
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        log "installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels into $SITE"
        if timeout $(( $(left) / 8 )) "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$SITE" "$ROOT"/.whl/*.whl; then setup_wheels="ok"; else setup_wheels="failed"; status=1; fi
    else
        setup_wheels="no .whl/ wheelhouse (run bench/gpu/wheels.sh here and carry .whl)"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "building g2rpo with the CUDA op (sm_90) into $SITE"
    if (cd "$ROOT" && G2RPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout $(( $(left) / 3 )) "$PY" -m pip \
            install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .); then
        setup_build=$("$PY" -c "import g2rpo.ops as o; print('ok, backends ' + ','.join(o.available_backends()))" 2>&1 | tail -1)
    else
        setup_build="failed"; status=1
    fi
    # tests marked gpu, run from outside the checkout so that the installed g2rpo is imported; real Triton kernels
    log "tests marked gpu"
    export TRITON_INTERPRET=0
    if (cd "$WORK" && timeout $(( $(left) / 5 )) "$PY" -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -m gpu -q \
            -p no:cacheprovider "$ROOT/tests" > "$OUT/gpu_tests.log" 2>&1); then
        setup_tests="ok: $(tail -1 "$OUT/gpu_tests.log")"
    else
        setup_tests="FAILED or out of time: $(tail -1 "$OUT/gpu_tests.log")"; status=1
    fi
    log "$setup_tests"
    RUN_DIR="$WORK"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$ROOT"
fi
"$PY" - "$WORK/stages/setup.json" "$setup_wheels" "$setup_build" "$setup_tests" "$DEVICE" "$TINY" "$BUDGET" <<'PYEOF'
import json, sys, torch
out, wheels, build, tests, device, tiny, budget = sys.argv[1:]
name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
json.dump({"device": name, "torch": torch.__version__, "mode": "tiny" if tiny else "full", "budget_s": int(budget),
           "wheels": wheels, "cuda_op_build": build, "gpu_tests": tests}, open(out, "w"), indent=1)
PYEOF

remaining_weight=0
for s in $STAGES; do remaining_weight=$((remaining_weight + WEIGHT[$s])); done
for s in $STAGES; do
    share=$(( $(left) * WEIGHT[$s] / remaining_weight ))
    remaining_weight=$((remaining_weight - WEIGHT[$s]))
    if [ "$share" -lt 3 ]; then
        log "stage $s not run: the budget is spent"
        echo "{\"status\": \"not run\", \"reason\": \"the --budget-s ${BUDGET} s budget was spent before it\"}" \
            > "$WORK/stages/stage_$s.json"
        continue
    fi
    log "stage $s (its share: ${share}s)"
    (cd "$RUN_DIR" && timeout -k 3 "$share" "$PY" "$ROOT/bench/gpu/acceptance.py" --stage "$s" \
        --device "$DEVICE" $TINY --out "$WORK/stages") > "$WORK/stages/stage_$s.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        status=1
        if [ ! -f "$WORK/stages/stage_$s.json" ]; then
            if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
                echo "{\"status\": \"out of time\", \"error\": \"stopped at its ${share}s share of the budget\"}" \
                    > "$WORK/stages/stage_$s.json"
            else
                echo "{\"status\": \"failed\", \"error\": \"exit $rc\"}" > "$WORK/stages/stage_$s.json"
            fi
        fi
    fi
done
"$PY" "$ROOT/bench/gpu/acceptance.py" --report --out "$WORK/stages" || status=1
cp "$WORK/stages/report.json" "$WORK/stages/report.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/details.tar.gz" -C "$WORK/stages" --exclude report.json --exclude report.md . 2>/dev/null
log "report: $OUT/report.md (exit $status; $(( $(date +%s) - START ))s of ${BUDGET}s)"
exit $status
