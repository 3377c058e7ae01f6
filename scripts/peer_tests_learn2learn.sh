#!/usr/bin/env bash
# Runs learn2learn's own unit tests against metaloop.compat.learn2learn and prints pass counts.
#
#   bash scripts/peer_tests_learn2learn.sh CHECKOUT
#
# CHECKOUT is a learn2learn checkout (a work tree with tests/unit) or a bare git directory of one
# (e.g. the search tool's fetch of github:learnables/learn2learn). Its tests are copied to a fresh
# folder under /tmp (never into this repository) and run with tests/compat/shims on PYTHONPATH, so
# `import learn2learn` is metaloop. The set is the issue's 54 test functions: algorithms (maml,
# metasgd, gbml), nn (kroneckers, misc, protonet), utils and data (task_dataset, transforms, utils).
# Left out, because they need a download: data/metadataset_test.py (FullOmniglot and MNIST in
# setUpClass), the Lightning *_notravis tests (CIFAR-FS, mini-ImageNet) and vision/. Also run and
# counted on its own line: nn/metaoptnet_test_notravis.py (no download; learn2learn needs qpth).
# PYTHON selects the interpreter (default: this checkout's .venv/bin/python).
set -euo pipefail

checkout=${1:?usage: bash scripts/peer_tests_learn2learn.sh CHECKOUT (a learn2learn work tree or bare git dir)}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d /tmp/l2l-peer-tests.XXXXXX)

if [ -d "$checkout/tests/unit" ]; then
    cp -r "$checkout/tests" "$work/"
elif git --git-dir="$checkout" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    # file by file: a fetched mirror may lack unrelated large blobs, which would stop `git archive`
    git --git-dir="$checkout" ls-tree -r --name-only HEAD tests | while read -r path; do
        mkdir -p "$work/$(dirname "$path")"
        git --git-dir="$checkout" show "HEAD:$path" > "$work/$path"
    done
else
    echo "error: $checkout is neither a learn2learn work tree (no tests/unit) nor a git directory" >&2
    exit 2
fi

main=(
    tests/unit/algorithms/maml_test.py tests/unit/algorithms/metasgd_test.py tests/unit/algorithms/gbml_test.py
    tests/unit/nn/kroneckers_test.py tests/unit/nn/misc.py tests/unit/nn/protonet_test.py
    tests/unit/utils_test.py
    tests/unit/data/task_dataset_test.py tests/unit/data/transforms_test.py tests/unit/data/utils_test.py
)
extra=(tests/unit/nn/metaoptnet_test_notravis.py)

cd "$work"
export PYTHONPATH="$repo/tests/compat/shims${PYTHONPATH:+:$PYTHONPATH}"
set +e
"$python" -m pytest -q -p no:cacheprovider --continue-on-collection-errors --rootdir "$work" --junitxml "$work/main.xml" "${main[@]}" > "$work/main.log" 2>&1
"$python" -m pytest -q -p no:cacheprovider --continue-on-collection-errors --rootdir "$work" --junitxml "$work/extra.xml" "${extra[@]}" > "$work/extra.log" 2>&1
set -e

# Totals come from the test files themselves (test_* methods of TestCase classes), so a file that
# fails to import counts all its tests as failed instead of vanishing from the count.
"$python" - "$work" "${main[*]}" "${extra[*]}" <<'PY'
import ast
import sys
import xml.etree.ElementTree as ET

work, groups = sys.argv[1], {"main": sys.argv[2].split(), "extra": sys.argv[3].split()}
for name, title in (("main", "the issue's set"), ("extra", "also (no download)")):
    passed = {
        (case.get("classname", ""), case.get("name", ""))
        for case in ET.parse(f"{work}/{name}.xml").iter("testcase")
        if not any(child.tag in ("failure", "error", "skipped") for child in case)
    }
    n_pass = n_total = 0
    for path in groups[name]:
        module = path[:-3].replace("/", ".")
        tree = ast.parse(open(f"{work}/{path}").read())
        tests = [
            (f"{module}.{cls.name}", fn.name)
            for cls in tree.body if isinstance(cls, ast.ClassDef)
            for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test")
        ]
        ok = sum(t in passed for t in tests)
        n_pass, n_total = n_pass + ok, n_total + len(tests)
        print(f"  {path.replace('tests/unit/', ''):40s} {ok:3d} / {len(tests):3d}")
    print(f"{title}: {n_pass} of {n_total} learn2learn unit tests pass")
print(f"logs: {work}/main.log, {work}/extra.log")
PY
