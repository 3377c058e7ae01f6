#!/usr/bin/env bash
# A single-node SLURM cluster on 127.0.0.1, for trying launcher=submitit_slurm and for the slow tests
# (tests/cli/test_slurm.py). No systemd, no cgroups, no accounting database; everything lives in DIR.
#
#   bash scripts/slurm_cluster.sh install     # Debian's slurmctld slurmd slurm-client munge, if missing (root)
#   bash scripts/slurm_cluster.sh start DIR   # munged, slurmctld, slurmd; waits until the node is idle
#   export SLURM_CONF=DIR/slurm.conf PATH=DIR/bin:$PATH   # sbatch, squeue, and DIR/bin/sacct
#   bash scripts/slurm_cluster.sh stop DIR    # cancels the jobs, stops the daemons, checks they are gone
#
# DIR/bin/sacct answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID` from squeue: without
# accounting storage sacct has nothing to say, and submitit would wait forever for a job that crashed.
# MinJobAge keeps finished jobs in squeue for a day. slurmctld starts clean (-c), so job ids restart at FirstJobId:
# SLURM_FIRST_JOB_ID, default a random multiple of 100 in 1000-9900, since Lightning derives a DDP job's MASTER_PORT
# from its job id (15000 + the last four digits) and two test clusters on one machine must not share ports.
# Ports: SLURMCTLD_PORT and SLURMD_PORT (default: free ones); CPUs: SLURM_CPUS (default: nproc); EnforcePartLimits:
# SLURM_ENFORCE_PART_LIMITS (default ALL: sbatch refuses a job the partition cannot run; NO: it waits, Reason=PartitionConfig).
set -euo pipefail

SCRIPTS=$(cd "$(dirname "$0")" && pwd)

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; }

install() {
    if installed; then return 0; fi
    # test workers (pytest -n 2) may install at once: one apt-get at a time, the others then find SLURM installed
    exec 9>/tmp/metaloop-slurm-install.lock
    flock -w 900 9 || die "another install of SLURM held /tmp/metaloop-slurm-install.lock for 15 minutes"
    if installed; then return 0; fi
    command -v apt-get >/dev/null || die "slurmctld, slurmd, sbatch or munged is missing and there is no apt-get to install them"
    [ "$(id -u)" = 0 ] || die "installing slurmctld slurmd slurm-client munge needs root (or install them yourself)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    installed || die "apt-get installed slurmctld slurmd slurm-client munge, but a command is still missing"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    local dir=$1
    installed || die "SLURM is not installed: run 'bash scripts/slurm_cluster.sh install' first"
    mkdir -p "$dir"/{state,spool,munge,bin}
    dir=$(cd "$dir" && pwd)
    [ -f "$dir/slurmctld.pid" ] && alive "$dir/slurmctld.pid" && die "a cluster already runs in $dir; stop it first"
    local cpus=${SLURM_CPUS:-$(nproc)}
    local ctld_port=${SLURMCTLD_PORT:-$(free_port)} d_port=${SLURMD_PORT:-$(free_port)}
    local first_job=${SLURM_FIRST_JOB_ID:-$(( (RANDOM % 90 + 10) * 100 ))}
    cat > "$dir/slurm.conf" <<EOF
ClusterName=metaloop
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
EnforcePartLimits=${SLURM_ENFORCE_PART_LIMITS:-ALL}
MinJobAge=86400
FirstJobId=$first_job
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cp "$SCRIPTS/slurm_sacct.sh" "$dir/bin/sacct"
    chmod +x "$dir/bin/sacct"
    [ -f "$dir/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -c -i -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf" -N localhost
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        [ "$state" = idle ] && { echo "SLURM_CONF=$dir/slurm.conf"; return 0; }
        sleep 0.5
    done
    tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    stop "$dir" || true
    die "the node did not become idle within 30 s (state: '${state:-no answer}'); see $dir/slurmctld.log and $dir/slurmd.log"
}

stop() {
    local dir=$1
    [ -f "$dir/slurm.conf" ] || die "$dir holds no slurm.conf: no cluster was started there"
    export SLURM_CONF=$dir/slurm.conf
    if alive "$dir/slurmctld.pid"; then
        scancel --full --quiet --state=PENDING,RUNNING -u "$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 20); do  # jobs end before their slurmd goes (at most 10 s)
            [ -z "$(squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    local pidfile pids=()
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if alive "$pidfile"; then pids+=("$(cat "$pidfile")"); kill "$(cat "$pidfile")"; fi
    done
    for _ in $(seq 1 40); do
        local left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.25
    done
    kill -9 "${left[@]}" 2>/dev/null || true
    sleep 0.5
    for pid in "${left[@]}"; do kill -0 "$pid" 2>/dev/null && die "daemon $pid of $dir is still running after SIGKILL"; done
    return 0
}

case "${1:-}" in
    install) install ;;
    start) [ $# -eq 2 ] || die "usage: slurm_cluster.sh start DIR"; start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: slurm_cluster.sh stop DIR"; stop "$2" ;;
    *) die "usage: slurm_cluster.sh install | start DIR | stop DIR" ;;
esac
