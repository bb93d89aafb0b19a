# ---- shared by every trellis job script (inserted by slurm/submit.py) ----
set -uo pipefail
cd {{workdir}}
{{exports}}
# Rendezvous at the first node's *address*: compute-node names often do not resolve from their peers.
FIRST_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node "$FIRST_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
[ -n "$MASTER_ADDR" ] || MASTER_ADDR="$(getent ahostsv4 "$FIRST_NODE" | awk 'NR==1 {print $1}')"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# A requeued job (our own requeue after the warning signal, or `scontrol requeue` from outside) resumes from
# the newest valid checkpoint instead of starting again from step 0.
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=(--checkpoint.resume=auto); fi
echo "trellis: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# The warning signal (--signal=B:SIG@secs) reaches this shell only: pass it to every rank (which finish the
# step, save a checkpoint and exit), then requeue. SIGTERM (scancel, `scontrol requeue`) is only passed on.
PREEMPTED=0
STEP_PID=""
on_warning() { PREEMPTED=1; echo "trellis: warning signal, checkpointing"; kill -"$1" "$STEP_PID" 2>/dev/null; }
on_term() { echo "trellis: SIGTERM, passing it to the ranks"; kill -TERM "$STEP_PID" 2>/dev/null; }
wait_step() {
  local rc
  while true; do
    wait "$STEP_PID"; rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # wait was interrupted by a trapped signal: keep waiting
  done
  return $rc
}
trap 'on_warning {{signal_name}}' {{signal_name}}
trap on_term TERM
