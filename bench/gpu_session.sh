#!/usr/bin/env bash
# A GPU session as separate device calls, each under 10 minutes:
#
#   bash bench/gpu_session.sh tests            # GPU equivalence tests of the kernels and fast path
#   bash bench/gpu_session.sh bench [args]     # every bench suite, headline cases first
#
# The bench writes its results file after every case (bench/conftest.py), so a call that is
# killed at its time limit still returns every finished case; a second `bench` call with
# `-k` picks up what the first did not reach. Results and the report go to $OUT when set.
#
# Environment:
#   FG_COMMIT      the commit being measured (a device copy of the tree may have no .git)
#   FG_BUDGET_S    seconds after which the bench starts no new case (default 480: the call,
#                  setup included, stays under 10 minutes; 0 = no budget)
#   PYTHON         interpreter (default python3)
# Wheels carried in .whl/ (e.g. PyAV) are installed to a temporary prefix first. DALI's
# wheel (~800 MB installed) is too large to carry, so without it installed on the machine
# the DALI cases skip with that reason.
set -uo pipefail
what=${1:-}
case "$what" in
    tests|bench) shift ;;
    *) echo "usage: bash bench/gpu_session.sh tests|bench [pytest args]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
marker=$(mktemp)
rc=0

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fg-site .whl/*.whl && export PYTHONPATH=/tmp/fg-site${PYTHONPATH:+:$PYTHONPATH}
fi
# kernels/ and csrc/ become fastground.kernels / fastground.csrc only through an install
if ! "$PY" -c "import fastground.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null \
        || echo "gpu_session: editable install not possible here; importing from the tree"
fi
if ! "$PY" -c "import fastground.kernels" 2>/dev/null; then
    # the same mapping as setup.py's package_dir, for this throw-away copy of the tree
    [ -e fastground/kernels ] || ln -s ../kernels fastground/kernels
    [ -e fastground/csrc ] || ln -s ../csrc fastground/csrc
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"

if [ "$what" = tests ]; then
    echo "== GPU equivalence tests: pytest tests -k 'kernel or fast or gpu_release'"
    "$PY" -m pytest tests -q -k "kernel or fast or gpu_release" "$@" 2>&1 | tee "$LOGS/tests.log"
    exit "${PIPESTATUS[0]}"
fi

echo "== bench: pytest bench/ --benchmark-only"
budget=${FG_BUDGET_S:-480}
budget_arg=(); [ "$budget" != 0 ] && budget_arg=(--fg-budget-s "$budget")
"$PY" -m pytest bench/ --benchmark-only -q "${budget_arg[@]}" "$@" 2>&1 | tee "$LOGS/bench.log"
b=${PIPESTATUS[0]}; [ "$b" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$b

new=$(find bench/results -maxdepth 1 -name '*.json' -newer "$marker")
rm -f "$marker"
if [ -n "${OUT:-}" ]; then
    for f in $new; do cp "$f" "$OUT/"; done
    "$PY" bench/report.py --out "$OUT/BENCHMARKS.md" >/dev/null || true
fi
echo "== results: ${new:-none written}"
exit "$rc"
