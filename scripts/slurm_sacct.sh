#!/usr/bin/env bash
# sacct for a SLURM cluster without accounting storage (scripts/slurm_cluster.sh): answers what submitit asks,
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
# from squeue, which lists finished jobs for MinJobAge seconds. Any other question is refused.
set -euo pipefail
fields="" ids=()
while [ $# -gt 0 ]; do
    case $1 in
        -o|--format) fields=$2; shift 2 ;;
        --format=*) fields=${1#--format=}; shift ;;
        -j|--jobs) ids+=("$2"); shift 2 ;;
        --jobs=*) ids+=("${1#--jobs=}"); shift ;;
        --parsable2|-P) shift ;;
        *) echo "sacct stand-in: unsupported argument $1 (only -o JobID,State,NodeList --parsable2 -j ID)" >&2; exit 2 ;;
    esac
done
[ "$fields" = "JobID,State,NodeList" ] || { echo "sacct stand-in: only -o JobID,State,NodeList, not '$fields'" >&2; exit 2; }
echo "JobID|State|NodeList"
[ ${#ids[@]} -gt 0 ] || exit 0
# a job that squeue no longer knows prints nothing, as sacct prints nothing for an unknown id
squeue -h -t all -o '%i|%T|%N' -j "$(IFS=,; echo "${ids[*]}")" 2>/dev/null || true
