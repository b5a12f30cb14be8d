#!/usr/bin/env bash
# Run by `srun` once per task: map SLURM's task ids onto the variables torch.distributed reads
# (deepspeed.init_distributed takes RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the
# environment), then become the training command.
#
#   srun launch/slurm/rank_env.sh python launch/train.py --config ... --deepspeed ...
#
# One task per GPU: LOCAL_RANK picks the device, so do not bind one GPU per task (--gpus-per-task) or
# every task would see its GPU as device 0.
set -euo pipefail
# A USR1 or TERM before Python runs launch/train.py's first lines (which record it: the run then stops before its
# first step, and the job requeues) would kill the rank, ending the job without a requeue: ignore them until
# then (the disposition is inherited through exec). One ignored is not lost: common.sh sends a stop again until
# the ranks listen.
trap '' USR1 TERM

missing=()
for v in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS MASTER_ADDR MASTER_PORT; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
done
if (( ${#missing[@]} )); then
    echo "rank_env.sh: error: ${missing[*]} not set; run me as 'srun launch/slurm/rank_env.sh CMD ...' inside" \
         "a SLURM allocation, with MASTER_ADDR/MASTER_PORT exported (launch/slurm/train.sbatch does this)" >&2
    exit 2
fi
(( $# )) || { echo "rank_env.sh: error: no command given" >&2; exit 2; }

export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
exec "$@"
