#!/usr/bin/env bash
# The GPU checks in one call: the CUDA tests, bench_losses.py and bench_step.py, then a summary.
#
#   bash benchmarks/run_cuda.sh              # on a CUDA machine; stage budgets of at most 525 s, compilation included
#   bash benchmarks/run_cuda.sh --rehearse   # on any machine: the same stages at smoke sizes on the CPU
#
# Each stage has its own time budget (GNU timeout, whole process group); a stage that fails or runs out
# of time is reported and the next one still runs. Output: JSON and markdown in $OUT when it is set
# (at most 8 files: the device tool brings back no more), else benchmarks/results/cuda_<gpu>_*:
#   <p>_summary.md  <p>_run.log  <p>_tests.xml  <p>_tests.txt  <p>_losses.{json,md}  <p>_step.{json,md}
# Needs python3 with torch, triton, torchvision, pytest; installs nothing. Exit status: 0 when
# every stage passed, 1 when one failed or timed out, 2 when CUDA is absent (without --rehearse).
# Budgets in seconds can be overridden: LRDET_BUDGET_TESTS, LRDET_BUDGET_LOSSES, LRDET_BUDGET_STEP.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Real kernels: tests/conftest.py leaves the Triton interpreter off (and test_kernels.py uncollected).
export LRDET_NO_INTERPRET=1
unset TRITON_INTERPRET
if [ "$REHEARSE" = 1 ]; then
  export LRDET_NO_INTERPRET=0 TRITON_INTERPRET=1
fi

# Budgets (s). With the probe's 60 s limit and timeout's 15 s grace per stage they add up to at most
# 525 s (180 + 150 + 90 + 60 + 3 x 15), first compilation included.
B_TESTS="${LRDET_BUDGET_TESTS:-180}"
B_LOSSES="${LRDET_BUDGET_LOSSES:-150}"
B_STEP="${LRDET_BUDGET_STEP:-90}"

# ---------------------------------------------------------------------------------------- probe
T_START=$(date +%s)
if ! GPU_NAME="$(timeout 60 "$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(3)
print(torch.cuda.get_device_name(0))
')"; then
  if [ "$REHEARSE" = 0 ]; then
    echo "run_cuda.sh: CUDA is not available to $PY (torch.cuda.is_available() is False or torch is missing);" \
         "nothing was run. On a machine without a GPU, 'bash benchmarks/run_cuda.sh --rehearse' checks the script." >&2
    exit 2
  fi
  GPU_NAME="cpu-rehearsal"
fi
TAG="$(printf '%s' "$GPU_NAME" | "$PY" -c '
import re, sys
name = sys.stdin.read()
m = re.search(r"\b([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
print((m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "gpu").lower())
')"
PREFIX="cuda_${TAG}"
DEST="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
LOG="$DEST/${PREFIX}_run.log"
STAGES=()

run_stage() {  # run_stage NAME BUDGET_S CMD...: one stage under its own time limit
  local name="$1" budget="$2"
  shift 2
  local t0 rc dt status
  t0=$(date +%s)
  echo
  echo "=== ${name} (budget ${budget} s): $*"
  timeout --kill-after=15 "$budget" "$@"
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) status="ok" ;;
    124|137) status="TIMED OUT after ${budget} s (partial results kept)" ;;
    *) status="FAILED (exit ${rc})" ;;
  esac
  echo "=== ${name}: ${status} in ${dt} s"
  STAGES+=("${name}|${status}|${dt}|${budget}")
}

main() {
  echo "run_cuda.sh: ${GPU_NAME}; results to ${DEST}/${PREFIX}_*; $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm \
    --format=csv,noheader 2>/dev/null
  "$PY" -c 'import sys, torch, triton, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "torchvision", torchvision.__version__)' || true

  # 1. the CUDA tests (xdist spreads them over 4 processes where it is installed)
  local workers=()
  if [ "$REHEARSE" = 0 ] && [ "${LRDET_PYTEST_WORKERS:-4}" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    workers=(-n "${LRDET_PYTEST_WORKERS:-4}")
  fi
  run_stage tests "$B_TESTS" bash -c 'set -o pipefail; "$0" -m pytest -m cuda tests/test_cuda.py -o addopts="" \
    -q -rfEs -p no:cacheprovider --junitxml="$1" "${@:3}" 2>&1 | tee "$2"' \
    "$PY" "$DEST/${PREFIX}_tests.xml" "$DEST/${PREFIX}_tests.txt" "${workers[@]}"

  # 2. the losses: every CUDA default case (N 16, 8, 2; fp32, bf16; torch, triton, then compile)
  local losses_args=(--batch 16 8 2 --warmup 5 --repeats 25)
  [ "$REHEARSE" = 1 ] && losses_args=(--quick --threads 1)
  run_stage losses "$B_LOSSES" "$PY" benchmarks/bench_losses.py "${losses_args[@]}" --out "$WORK" \
    --tag "${PREFIX}_losses"
  for ext in json md; do
    [ -f "$WORK/${PREFIX}_losses.$ext" ] && cp "$WORK/${PREFIX}_losses.$ext" "$DEST/"
  done

  # 3. one training step: ResNet-50 FPN RetinaNet and FCOS, LR 400 px / HR 800 px, batch 2
  local step_args=(--backbone resnet50 --models retinanet fcos --raw 800 --lr-size 400 --hr-size 800
                   --batch 2 --warmup 2 --repeats 5)
  [ "$REHEARSE" = 1 ] && step_args=(--models retinanet --raw 128 --lr-size 64 --hr-size 128 --channels 32
                                    --repeats 1 --warmup 0 --threads 1)
  run_stage step "$B_STEP" "$PY" benchmarks/bench_step.py "${step_args[@]}" --out "$WORK/${PREFIX}_step.json"
  for ext in json md; do
    [ -f "$WORK/${PREFIX}_step.$ext" ] && cp "$WORK/${PREFIX}_step.$ext" "$DEST/"
  done

  # 4. the summary, printed last
  local stages_text
  stages_text="$(printf '%s\n' "${STAGES[@]}")"
  "$PY" - "$DEST" "$PREFIX" "$GPU_NAME" "$(( $(date +%s) - T_START ))" "$stages_text" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

dest, prefix, gpu, total, stages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
path = lambda suffix: os.path.join(dest, f"{prefix}_{suffix}")  # noqa: E731
out = [f"# CUDA run: {gpu}, {total} s in all", "", "| stage | result | time / budget |", "|---|---|---|"]
for line in filter(None, stages.splitlines()):
    name, status, dt, budget = line.split("|")
    out.append(f"| {name} | {status} | {dt} s / {budget} s |")

out += ["", "## CUDA tests"]
try:
    root = ET.parse(path("tests.xml")).getroot()
    cases = list(root.iter("testcase"))
    bad = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    out.append(f"{len(cases)} collected: {len(cases) - len(bad) - len(skipped)} passed, {len(bad)} failed, "
               f"{len(skipped)} skipped")
    for c in bad:
        el = c.find("failure") if c.find("failure") is not None else c.find("error")
        msg = (el.get("message") or "").splitlines()[0][:200] if el is not None else ""
        out.append(f"- FAILED {c.get('name')}: {msg}")
    reasons = sorted({(c.find('skipped').get('message') or '')[:120] for c in skipped})
    out += [f"- skipped: {r}" for r in reasons]
except (OSError, ET.ParseError) as err:
    out.append(f"no test report ({type(err).__name__}: {err})")

out += ["", "## Loss goals (bench_losses.py, Triton at the largest batch measured)"]
try:
    report = json.load(open(path("losses.json")))
    out += ["", "| loss | goal | target | measured | status |", "|---|---|---|---|---|"]
    for g in report["goals"]:
        target = f">= {g['target']:.0f}% of copy" if g["kind"] == "bandwidth" else f">= {g['target']:.0f}x eager"
        out.append(f"| {g['loss']} | {g['kind']} | {target} | {g['measured']} | {g['status']} |")
    noise = [r for r in report["rows"] if r.get("noise")]
    out.append(f"\n{len(report['rows'])} cases measured, {len(noise)} flagged as noise, "
               f"{len(report.get('failures', []))} failed.")
    out += [f"- FAILED {f[:200]}" for f in report.get("failures", [])]
except (OSError, ValueError, KeyError) as err:
    out.append(f"no loss benchmark ({type(err).__name__}: {err})")

out += ["", "## Training step (bench_step.py)"]
try:
    step = json.load(open(path("step.json")))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for model, r in step["results"].items():
        cells = [f"{m} {med(r[m]['times_s']['step']) * 1e3:.0f} ms" for m in ("lr", "hr", "lrdet") if m in r]
        out.append(f"- {model}: " + ", ".join(cells))
    out += [f"- FAILED {f.splitlines()[0][:200]}" for f in step.get("failures", [])]
except (OSError, ValueError, KeyError) as err:
    out.append(f"no step benchmark ({type(err).__name__}: {err})")

text = "\n".join(out) + "\n"
open(path("summary.md"), "w").write(text)
print("\n" + text, end="")
EOF
}

main 2>&1 | tee "$LOG"
rm -rf "$WORK"
exit "$(grep -q '^=== [a-z]*: \(FAILED\|TIMED OUT\)' "$LOG" && echo 1 || echo 0)"
