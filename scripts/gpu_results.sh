#!/usr/bin/env bash
# Issue 14's GPU figures and issue 15's results tables on one GPU machine, in one call of about 9 minutes:
#   1. python -m benchmarks.gpu (metaloop, higher and plain PyTorch on the same GPU), alone on the GPU;
#   2. at once: every Omniglot recipe (reports.omniglot, a time budget per fit) and the cross-alphabet
#      recipes (reports.cross_alphabet) on the GPU.
# Run from the repository root with CUDA torch, lightning and hydra-core installed (no internet needed;
# metaloop runs from this checkout). With $OUT set, one file lands there, gpu_results.tar.gz: the reports
# (md, json, png), the benchmark table, the logs and the runs' metrics (a lent machine returns few files);
# reports/*.json are read first, so rows measured elsewhere are kept.
#   MINUTES=5 OUT=/tmp/out bash scripts/gpu_results.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FINAL=${OUT:-.}
OUT=$(mktemp -d /tmp/metaloop_gpu_results.XXXX)
MINUTES=${MINUTES:-5}            # wall-time budget of each Omniglot fit
BENCH_S=${BENCH_S:-110}          # the benchmarks' time limit
RUNS=$(mktemp -d /tmp/metaloop_runs.XXXX)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT/reports" "$OUT/logs"
cp reports/*.json "$OUT/reports/"
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*"; }

{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    "$PY" -c "import torch, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__)"
    nproc

    stamp "benchmarks.gpu starts"
    timeout "$BENCH_S" "$PY" -m benchmarks.gpu --out "$OUT/bench" > "$OUT/logs/bench.log" 2>&1
    stamp "benchmarks.gpu: exit $?"

    stamp "Omniglot and cross-alphabet fits start ($MINUTES min each)"
    LIMIT=$(( (MINUTES + 3) * 60 ))
    timeout "$LIMIT" "$PY" -m reports.omniglot --device gpu --minutes "$MINUTES" --steps 100000 --val-every 250 \
        --also-20way protonet_omniglot mamlpp_omniglot reptile_omniglot cavia_omniglot boil_omniglot --jobs 18 \
        --override mamlpp_omniglot:mamlpp.msl_anneal_steps=500 mamlpp_omniglot:mamlpp.first_order_steps=0 cavia_omniglot:inner.lr=10 \
        --runs "$RUNS/omniglot" --report-dir "$OUT/reports" > "$OUT/logs/omniglot.log" 2>&1 &
    OMNI=$!
    timeout "$LIMIT" "$PY" -m reports.cross_alphabet --device gpu --minutes "$MINUTES" --steps 100000 \
        --train-ways 20 --recipes maml_omniglot_20way protonet_omniglot --jobs 2 \
        --runs "$RUNS/cross_alphabet" --report-dir "$OUT/reports" > "$OUT/logs/cross_alphabet.log" 2>&1 &
    CROSS=$!
    wait $OMNI; stamp "reports.omniglot: exit $?"
    wait $CROSS; stamp "reports.cross_alphabet: exit $?"
    for log in "$OUT"/logs/*.log; do echo "=== tail $log"; tail -n 5 "$log"; done
} 2>&1 | tee "$OUT/logs/gpu_results.log"

# the runs' small files (metrics, results, configs, the fit/test logs), no checkpoints
(cd "$RUNS" && find . \( -name metrics.csv -o -name results.json -o -name config.yaml -o -name overrides.yaml -o -name '*.log' \) \
    -size -2M -print0 | tar --null -czf "$OUT/runs.tar.gz" --files-from=-) || true
tar -czf "$FINAL/gpu_results.tar.gz" -C "$OUT" . && echo "wrote $FINAL/gpu_results.tar.gz"
