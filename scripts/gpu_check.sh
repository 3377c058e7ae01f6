#!/usr/bin/env bash
# The GPU commands of README "Scaling out", with tiny budgets, on one GPU machine (about 2-3 minutes).
# Run from the repository root on a machine with CUDA torch, lightning and hydra-core installed (no
# internet needed; metaloop runs from this checkout). Prints what the commands print; with $OUT set,
# also writes gpu_check.log, the runs' results.json and the sweep's sweep_results.md there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-}
RUNS=$(mktemp -d /tmp/metaloop_gpu_check.XXXX)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$RUNS/gpu_check.log}
status=0

step() {  # step NAME COMMAND...: runs and echoes a command, recording its exit code
    local name=$1; shift
    echo; echo "=== $name: $*"
    local start=$SECONDS
    "$@"; local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    "$PY" -c "import torch, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count(), '| lightning', lightning.__version__, '| hydra', hydra.__version__)" \
        || { echo "metaloop needs torch, lightning and hydra-core: pip install -e . (offline: from local wheels)"; exit 1; }

    # one GPU (README: metaloop fit --config maml_omniglot.yaml trainer=gpu), 20 meta-steps
    step one_gpu "$PY" -m metaloop fit --config maml_omniglot.yaml trainer=gpu trainer.max_steps=20 \
        trainer.val_check_interval=10 hydra.run.dir="$RUNS/one_gpu"

    # a sweep with one job per GPU (README: launcher=parallel), two seeds, 20 meta-steps each
    if "$PY" -c "import hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then launcher=launcher=parallel; else
        echo "(hydra-joblib-launcher is not installed: the sweep runs its jobs one after another)"; launcher=launcher=basic; fi
    step sweep "$PY" -m metaloop fit -m --config maml_omniglot.yaml trainer=gpu "$launcher" seed=0,1 \
        trainer.max_steps=20 trainer.val_check_interval=10 hydra.sweep.dir="$RUNS/sweep"

    # N GPUs (README: trainer=ddp trainer.devices=N), where the machine has two or more
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "${gpus:-0}" -ge 2 ]; then
        step ddp "$PY" -m metaloop fit --config maml_omniglot.yaml trainer=ddp trainer.devices=2 trainer.max_steps=20 \
            trainer.val_check_interval=10 hydra.run.dir="$RUNS/ddp"
    fi
    echo; echo "=== sweep_results.md"; cat "$RUNS/sweep/sweep_results.md" 2>/dev/null || echo "(none)"
    echo "=== gpu_check: $([ $status -eq 0 ] && echo all commands passed || echo a command FAILED)"
} 2>&1 | tee "$LOG"

if [ -n "$OUT" ]; then
    for run in one_gpu ddp; do [ -f "$RUNS/$run/results.json" ] && cp "$RUNS/$run/results.json" "$OUT/${run}_results.json"; done
    cp "$RUNS/sweep/sweep_results.md" "$RUNS/sweep/sweep_results.csv" "$OUT/" 2>/dev/null
fi
grep -q "all commands passed" "$LOG"
