# Shared by the sbatch scripts in this directory; sourced, not run. sbatch executes a spooled copy of the
# job script, so they find this file through the submit directory (the repository root).
#
# Variables (sbatch passes the submitting shell's environment to the job):
#   RECIPE        YAML recipe (default launch/configs/paper_250m.yaml)
#   DS_CONFIG     DeepSpeed JSON (default ds_configs/zero2.json)
#   OUTPUT_DIR    run directory; default: the recipe's output_dir
#   TRAIN_ARGS    more launch/train.py flags, split on whitespace (newlines too); quotes are not interpreted
#   GPU_MEMORY_GB preflight's --gpu-memory-gb: refuse a run whose estimated peak memory per GPU exceeds it
#   PYTHON        interpreter with relora_ds installed (default: python on PATH)
#   MASTER_PORT   rendezvous port on the first node (default: 20000 + job id mod 10000, below Linux's ephemeral ports 32768-60999)
#   TORCH_EXTENSIONS_DIR  DeepSpeed's JIT-compiled ops (default: per job, node-local /tmp)
#   REQUEUE_SIGNALS  signals after whose checkpoint the job requeues itself: USR1, TERM or both (default: USR1;
#                    "SIGUSR1 SIGTERM", "usr1,term" are the same; anything else stops the job before it starts)
#   STOP_RESEND_S    seconds between the sends of a stop signal to ranks not yet listening (default 5; see _forward)

SCRIPT=${SCRIPT:-launch/slurm}  # set by the sourcing script, prefixes its messages
say() { echo "$SCRIPT: $*"; }
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

# Missing SLURM variables mean the script was run outside sbatch (or with too few options): stop here.
# First of all, USR1/TERM are caught until srun_with_requeue forwards them: uncaught, one during start-up
# (preflight takes seconds; a preemption's TERM, --signal=B:USR1 on a short job) killed the script (138/143)
# with nothing saved and no requeue.
require_slurm_job() {
    trap '_signal_before_ranks USR1' USR1
    trap '_signal_before_ranks TERM' TERM
    parse_requeue_signals
    [[ "${STOP_RESEND_S:-5}" =~ ^([0-9]+|[0-9]*[.][0-9]+)$ && ! "${STOP_RESEND_S:-5}" =~ ^[0.]+$ ]] \
        || die "STOP_RESEND_S=\"$STOP_RESEND_S\" is not a positive number of seconds (e.g. 5 or 0.5)"
    local v missing=()
    for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NTASKS "$@"; do
        [[ -n "${!v:-}" ]] || missing+=("$v")
    done
    (( ${#missing[@]} == 0 )) || die "${missing[*]} not set: submit this script with sbatch (not bash)" \
        "from the repository root, with --nodes and --ntasks-per-node"
    command -v srun >/dev/null && command -v scontrol >/dev/null || die "srun/scontrol not on PATH on $(hostname)"
    cd "${SLURM_SUBMIT_DIR:-.}"
    [[ -f launch/train.py ]] || die "launch/train.py not found in $PWD: submit from the repository root"
}

# Sets train_args (launch/train.py flags), out_dir and world_size after checking them for WORLD ranks
# (launch/preflight.py); MASTER_ADDR is MASTER (the second argument) or the allocation's first node.
prepare_training() {
    local world=$1 master=${2:-} extra=()
    world_size=$world
    PYTHON=${PYTHON:-python}
    train_args=(--config "${RECIPE:-launch/configs/paper_250m.yaml}" --deepspeed "${DS_CONFIG:-ds_configs/zero2.json}"
                --resume)
    [[ -z "${OUTPUT_DIR:-}" ]] || train_args+=(--output-dir "$OUTPUT_DIR")
    # -d '': the whole value (a plain `read` stopped at its first newline, dropping the flags after it)
    read -r -d '' -a extra <<< "${TRAIN_ARGS:-}" || true
    train_args+=(${extra[@]+"${extra[@]}"})  # (an empty array under set -u fails on bash < 4.4)
    # GPU_MEMORY_GB (preflight only): refuse a run whose estimated peak memory per GPU exceeds it
    out_dir=$("$PYTHON" launch/preflight.py --world-size "$world" ${GPU_MEMORY_GB:+--gpu-memory-gb "$GPU_MEMORY_GB"} \
              "${train_args[@]}") || exit 2
    # Made here, before any rank looks: a node that looked up a missing output_dir may cache its absence on NFS
    # for up to a minute (the trainer checks that every rank sees rank 0's lock file there)
    mkdir -p "$out_dir"

    # awk reads the whole list (head would close the pipe early: scontrol's SIGPIPE fails pipefail on huge jobs)
    # `|| die`: under set -e a failing scontrol in a plain assignment ended the script (exit 1) before this message
    MASTER_ADDR=$master
    if [[ -z "$MASTER_ADDR" ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1') \
            || die "could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with scontrol (its error above)"
    fi
    [[ -n "$MASTER_ADDR" ]] || die "could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with scontrol"
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_$(id -un)_$SLURM_JOB_ID}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    say "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $world rank(s) on $SLURM_JOB_NUM_NODES node(s)" \
         "($SLURM_JOB_NODELIST), master $MASTER_ADDR:$MASTER_PORT, output $out_dir"
}

# requeue_signals: REQUEUE_SIGNALS as "USR1", "TERM" or "USR1 TERM". Commas or spaces separate, case and a SIG
# prefix do not matter; anything else is an error, since a spelling that matched nothing silently disabled
# the requeue ("SIGUSR1 SIGTERM": the job ended COMPLETED after its checkpoint and never resumed).
parse_requeue_signals() {
    local raw=${REQUEUE_SIGNALS:-USR1} word sig words=()
    requeue_signals=""
    read -r -d '' -a words <<< "${raw//,/ }" || true
    for word in ${words[@]+"${words[@]}"}; do
        sig=${word^^}
        sig=${sig#SIG}
        [[ "$sig" == USR1 || "$sig" == TERM ]] \
            || die "REQUEUE_SIGNALS=\"$raw\": '$word' is not a signal the job can requeue on; valid: USR1, TERM" \
                   "(e.g. REQUEUE_SIGNALS=\"USR1 TERM\")"
        [[ " $requeue_signals " == *" $sig "* ]] || requeue_signals="${requeue_signals:+$requeue_signals }$sig"
    done
    [[ -n "$requeue_signals" ]] || die "REQUEUE_SIGNALS=\"$raw\" names no signal; valid: USR1, TERM"
}

# require_slurm_job's trap until srun_with_requeue's: with no rank started there is nothing to forward or
# checkpoint, so stop now (training would start and ignore the signal): requeue for a signal in
# REQUEUE_SIGNALS (the job starts again with --resume), else exit 128 + the signal's number.
_signal_before_ranks() {
    local status=$((128 + $(kill -l "$1")))
    trap '' USR1 TERM  # one answer: SLURM's TERM that ends a requeued or cancelled job comes next
    if [[ " ${requeue_signals:-USR1} " == *" $1 "* && -n "${SLURM_JOB_ID:-}" ]]; then
        say "got SIG$1 before the ranks started: not starting them; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0  # ends this script; the job restarts with --resume
        say "scontrol requeue $SLURM_JOB_ID failed (its error above): the job ends here"
    else
        say "got SIG$1 before the ranks started: not starting them; not requeueing" \
            "(REQUEUE_SIGNALS=${requeue_signals:-USR1}); exit $status"
    fi
    exit "$status"
}

# Run `srun ARGS...` and wait for it, forwarding USR1/TERM to it. When a forwarded signal made the ranks
# checkpoint and exit cleanly (the trainer's last metrics line is its "preempted" event), requeue the job
# if the signal is in REQUEUE_SIGNALS. Exits with srun's status.
srun_with_requeue() {
    local rc=0 late=0
    [[ -n "${requeue_signals:-}" ]] || parse_requeue_signals
    stop_signal=""
    srun_pid=""
    resend_pid=""
    listening_mark=$(_run_info_size)  # see _ranks_listen
    trap '_forward USR1' USR1
    trap '_forward TERM' TERM
    # srun in the background: bash runs a trap only between commands, and `wait` returns when one arrives.
    # srun answers SIGTERM by SIGKILLing its tasks before they can checkpoint (tested: a TERM forwarded to
    # srun ends the job 137), so srun ignores TERM and _forward signals the ranks through scancel.
    # --export=ALL: this script's variables (MASTER_ADDR/PORT, TORCH_EXTENSIONS_DIR, the venv's PATH) reach
    # the tasks even where the site or the user submits with --export=NONE (srun would inherit that).
    ( trap '' TERM; exec srun --export=ALL "$@" ) &
    srun_pid=$!
    wait "$srun_pid" || rc=$?
    while kill -0 "$srun_pid" 2>/dev/null; do  # woken by a trap: keep waiting while the ranks save
        rc=0
        wait "$srun_pid" || rc=$?
    done
    # If srun ended just after a trap woke `wait`, its status is still there to collect (127: collected).
    wait "$srun_pid" 2>/dev/null || late=$?
    (( late == 127 )) || rc=$late
    if [[ -n "$resend_pid" ]]; then
        kill "$resend_pid" 2>/dev/null || true
        wait "$resend_pid" 2>/dev/null || true
    fi

    if [[ -n "$stop_signal" && $rc -eq 0 ]] \
        && tail -n 1 "$out_dir/metrics.jsonl" 2>/dev/null | grep -q '"preempted"'; then
        if [[ " $requeue_signals " == *" $stop_signal "* ]]; then
            say "checkpoint saved after SIG$stop_signal; requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"  # ends this script; the job restarts with --resume
        else
            say "checkpoint saved after SIG$stop_signal; not requeueing (REQUEUE_SIGNALS=$requeue_signals)"
        fi
    fi
    exit "$rc"
}

_forward() {
    stop_signal=$1
    local as=${FORWARD_AS:-$1}
    say "got SIG$1: forwarding it to the ranks${FORWARD_AS:+ as SIG$as} (they finish the step, checkpoint and" \
        "exit; ranks still starting up stop before their first step, with nothing to save)"
    # To the tasks of the job's steps, not to srun (see above) nor to this script (no --batch). It fails,
    # harmlessly, when SLURM is already cancelling the job: then SLURM signals the ranks itself.
    scancel --signal="$as" "$SLURM_JOB_ID" 2>/dev/null || true
    # Ranks not yet listening lose it, and would train to the time limit: before srun's step exists, scancel
    # signals nothing (and exits 0: seen with SLURM 22.05), and until launch/train.py's first lines record a
    # stop, the step's processes ignore it (rank_env.sh; ds_node.sh and the deepspeed launcher under it, for
    # seconds of imports). So send it again until they listen, then once more.
    if [[ -z "$resend_pid" ]] && ! _ranks_listen; then
        say "the ranks may not be listening yet: sending SIG$as again every ${STOP_RESEND_S:-5} s until they are"
        _resend_until_heard "$as" &
        resend_pid=$!
    fi
}

# Whether every rank runs launch/train.py's signal handlers: the trainer appends to run_info.jsonl once every rank
# has joined the process group, which each does after those first lines (listening_mark: the size before srun).
_ranks_listen() {
    (( $(_run_info_size) > listening_mark ))
}

_run_info_size() {
    stat -c %s "$out_dir/run_info.jsonl" 2>/dev/null || echo 0
}

# In the background (_forward): SIG$1 to the job's steps every STOP_RESEND_S seconds until the ranks listen, then
# once more; srun_with_requeue ends it when srun ends.
_resend_until_heard() {
    local heard=0
    until (( heard )); do
        sleep "${STOP_RESEND_S:-5}"
        ! _ranks_listen || heard=1
        scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || true
    done
}
