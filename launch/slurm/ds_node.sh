#!/usr/bin/env bash
# Run by srun once per node (launch/slurm/train_deepspeed.sbatch): start this node's ranks with the
# deepspeed launcher in --no_ssh mode, so no node needs ssh access to another.
#
#   srun --ntasks-per-node=1 launch/slurm/ds_node.sh HOSTFILE [LAUNCHER OPTIONS] launch/train.py --config ...
#
# --node_rank is this node's 0-based position among the hostfile's host lines (launch/hostfile.py
# node-rank): the launcher gives node i the slots of host line i and numbers its ranks after those of
# lines 0..i-1, on GPUs 0..slots-1 (a CUDA_VISIBLE_DEVICES naming other GPUs is refused: the launcher
# would not honour it).
set -euo pipefail
# SLURM delivers a step signal to every process of the step. The launcher processes ignore USR1 (the
# disposition is inherited; launch/train.py installs its own handler first thing): its default action would kill the
# launcher, end the step, and SLURM would then kill the ranks before their checkpoint is written. The runner
# (this task's top process) ignores TERM too and waits for its launcher: it has no TERM handler of its own
# with --no_ssh, and died of it at once (the step over, the ranks killed unsaved). The launcher under it,
# deepspeed.launcher.launch, installs its own TERM handler: it terminates the ranks, gives them 30 s, and
# exits 1; train_deepspeed.sbatch therefore forwards its signals to the ranks as USR1. From the first line: a
# signal during the hostfile check below would kill this task, and with it the step. One ignored here is not lost:
# common.sh sends a stop again until the ranks listen.
trap '' USR1 TERM

(( $# >= 2 )) || { echo "ds_node.sh: error: usage: ds_node.sh HOSTFILE [LAUNCHER OPTIONS] SCRIPT [ARGS...]" >&2
                   exit 2; }
for v in MASTER_ADDR MASTER_PORT; do
    [[ -n "${!v:-}" ]] || { echo "ds_node.sh: error: $v not set (train_deepspeed.sbatch exports it)" >&2; exit 2; }
done
hostfile=$1; shift
PYTHON=${PYTHON:-python}
# Launcher options that choose hosts or GPUs, or that this script sets (train_deepspeed.sbatch checks its
# DS_LAUNCHER_ARGS as well; another scheduler's job line reaches only this check)
"$PYTHON" launch/hostfile.py launcher-args --before-script -- "$@" || exit 2
line=$("$PYTHON" launch/hostfile.py node-rank --check-visible-devices --with-slots "$hostfile") || exit 2
read -r node_rank slots <<< "$line"
# train_deepspeed.sbatch's CPUs per node task, shared by this node's ranks (unless OMP_NUM_THREADS was given)
if [[ -n "${DS_NODE_CPUS:-}" ]]; then
    export OMP_NUM_THREADS=$(( DS_NODE_CPUS / slots > 0 ? DS_NODE_CPUS / slots : 1 ))
fi

exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank="$node_rank" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"
