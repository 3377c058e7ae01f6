#!/usr/bin/env bash
# Runs higher's own test suite against metaloop and prints the pass count.
#   scripts/peer_tests_higher.sh CHECKOUT_OF_HIGHER
# CHECKOUT_OF_HIGHER is a copy of github.com/facebookresearch/higher (its tests/ is used; keep it
# outside this repository). The shim package tests/compat/shims/higher (metaloop re-exported
# under higher's module names) comes first on PYTHONPATH, so `import higher` imports metaloop.
# Needs the repo's venv (scripts/setup.sh) plus `parameterized`, which higher's tests import.
set -euo pipefail
if [ $# -ne 1 ] || [ ! -d "$1/tests" ]; then
    echo "usage: $0 CHECKOUT_OF_HIGHER   (a directory holding higher's tests/)" >&2
    exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="$REPO/.venv/bin/python"
"$PYTHON" -c "import parameterized" 2>/dev/null || "$PYTHON" -m pip install -q parameterized
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp -r "$1/tests" "$WORK/tests"   # without higher/ beside it, only the shim can be imported
cd "$WORK"
PYTHONPATH="$REPO/tests/compat/shims:$REPO" "$PYTHON" -c \
    "import higher, metaloop; assert higher.innerloop_ctx is metaloop.innerloop_ctx, higher.__file__"
set +e
PYTHONPATH="$REPO/tests/compat/shims:$REPO" "$PYTHON" -m pytest -q -p no:cacheprovider tests "${@:2}" | tee "$WORK/log"
status=${PIPESTATUS[0]}
set -e
summary=$(tail -n 1 "$WORK/log")
passed=$(grep -o '[0-9]\+ passed' <<<"$summary" | grep -o '[0-9]\+' || echo 0)
total=$(( $(grep -o '[0-9]\+ \(passed\|failed\|error\|errors\)' <<<"$summary" | grep -o '[0-9]\+' | paste -sd+) ))
echo "higher's suite against metaloop: $passed/$total passed"
exit "$status"
