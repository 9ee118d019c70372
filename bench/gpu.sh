#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one command, on a GPU machine that has its own torch and
# no internet. bench/RESULTS.md ("How the GPU figures are made") says how to prepare what it needs:
# wheels/ (what the benchmarks import that the machine lacks) and the JPEG copy of the dataset.
#
#   bash bench/gpu.sh [DATA] [MINUTES] [more flags of bench.all, e.g. --only paper-protocol]
#
# DATA     the dataset's JPEG copy from bench/pack_data.py (default var/bench-data); without it the
#          paper's protocol is reported as skipped
# MINUTES  the budget of bench.all, results written included (default 8); give the command a minute
#          more than that for the installs
# WHEELS   (environment) the wheels' folder, default wheels/
# Results: bench-all.md, bench-all.json and bench-all.log in $OUT when it is set, else test-artifacts/.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${1:-var/bench-data}
MINUTES=${2:-8}
shift $(( $# < 2 ? $# : 2 ))
WHEELS=${WHEELS:-wheels}
RESULTS=${OUT:-test-artifacts}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

if [ -d "$WHEELS" ]; then
    # The machine's own torch, numpy and the rest stay as they are: only the listed packages, from
    # the carried wheels alone (--no-index: there is nothing else to reach).
    if ! "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
            -r bench/requirements-gpu.txt; then
        echo "gpu.sh: installing from $WHEELS failed; the parts that need those packages will report it" >&2
    fi
else
    echo "gpu.sh: no $WHEELS folder; using only what this machine has installed" >&2
fi

data=()
if [ -d "$DATA" ]; then
    data=(--data "$DATA")
else
    echo "gpu.sh: no dataset folder at $DATA; the paper's protocol will be reported as skipped" >&2
fi

"$PYTHON" -m bench.all --device cuda --minutes "$MINUTES" ${data[@]+"${data[@]}"} --out "$RESULTS/bench-all.md" \
    "$@" 2>&1 | tee "$RESULTS/bench-all.log"
