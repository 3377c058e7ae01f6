#!/usr/bin/env bash
# Runs learn2learn's official vision examples, unchanged, against metaloop.compat.learn2learn:
#   examples/vision/maml_omniglot.py, anilkfo_cifarfs.py and metacurvature_fc100.py
# The CIFAR-FS and FC100 ones read small generated files of the published formats (scripts/fewshot_data.py);
# maml_omniglot reads the full Omniglot from ~/data/omniglot-py if present, else falls back (with a warning)
# to the minimal Omniglot splits bundled with metaloop. Needs l2l.algorithms (MAML) and l2l.nn (Lambda, Flatten)
# in metaloop.compat.learn2learn, and a shim package named learn2learn (tests/compat/shims/learn2learn).
#
#   scripts/l2l_examples.sh [LEARN2LEARN_CHECKOUT] [ITERATIONS]
#
# LEARN2LEARN_CHECKOUT: a clone of github.com/learnables/learn2learn (default: cloned into a temporary folder;
# needs network access). ITERATIONS: meta-iterations per example (default 20). Each example runs with its own
# hyperparameters, cuda off, and prints its meta-train/valid accuracy every iteration, then the meta-test ones.
# HOME is pointed at a temporary folder, so the examples' root='~/data' is the generated data, not yours.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
l2l="${1:-}"
iterations="${2:-20}"
if [[ -z "$l2l" ]]; then
  git clone --depth 1 https://github.com/learnables/learn2learn "$work/learn2learn-src"
  l2l="$work/learn2learn-src"
fi
shim="$repo/tests/compat/shims"
[[ -f "$shim/learn2learn/__init__.py" ]] || { echo "missing the learn2learn shim at $shim/learn2learn" >&2; exit 1; }

# the examples' data: ~/data in a temporary HOME, with CIFAR-FS and FC100 stand-ins (64/16/20 classes, 20 images each)
mkdir -p "$work/home/data"
if [[ -d "$HOME/data/omniglot-py" ]]; then ln -s "$HOME/data/omniglot-py" "$work/home/data/omniglot-py"; fi
"$python" "$repo/scripts/fewshot_data.py" "$work/home/data" cifarfs fc100 --classes 64 16 20 --per-class 20

cp "$l2l"/examples/vision/{maml_omniglot,anilkfo_cifarfs,metacurvature_fc100}.py "$work/"
cd "$work"
for example in maml_omniglot anilkfo_cifarfs metacurvature_fc100; do
  echo "=== $example ($iterations meta-iterations)"
  HOME="$work/home" PYTHONPATH="$shim:$work${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -c "import $example as e; e.main(num_iterations=$iterations, cuda=0)"
done
