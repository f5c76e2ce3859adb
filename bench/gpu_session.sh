#!/usr/bin/env bash
# One call on a lent GPU machine, in one go: the GPU equivalence tests of the kernels and
# the fast path, then every bench suite, then the results copied to $OUT (when set).
#
#   bash bench/gpu_session.sh [extra pytest arguments for the bench run]
#
# Environment:
#   FG_COMMIT      the commit being measured (a device copy of the tree may have no .git)
#   FG_BUDGET_S    seconds after which the bench run starts no new case (default 420, so
#                  tests + bench fit one 10-minute device call; 0 = no budget)
#   FG_SKIP_TESTS  1 to go straight to the bench run
#   PYTHON         interpreter (default python3)
# Wheels carried in .whl/ (e.g. PyAV) are installed to a temporary prefix first. DALI's
# wheel (~800 MB installed) is too large to carry, so without it installed on the machine
# the DALI cases skip with that reason.
set -uo pipefail
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

if [ "${FG_SKIP_TESTS:-0}" != 1 ]; then
    echo "== GPU equivalence tests: pytest tests -k 'kernel or fast or gpu_release'"
    "$PY" -m pytest tests -q -k "kernel or fast or gpu_release" 2>&1 | tee "$LOGS/tests.log"
    t=${PIPESTATUS[0]}; [ "$t" -ne 0 ] && rc=$t
fi

echo "== bench: pytest bench/ --benchmark-only"
budget=${FG_BUDGET_S:-420}
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
