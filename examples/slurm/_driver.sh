# Sourced by the staged-run sbatch scripts: run the megagrow driver so that a SLURM time limit or
# scancel ends in a saved checkpoint and a requeue, not in lost work.
#   `#SBATCH --signal=B:USR1@600` sends USR1 to this batch shell 10 minutes before the limit; the trap
#   passes it to the driver, which asks the running stage (its srun step's tasks) to save and exit.
#   The driver then exits with 143 and the job requeues itself (`#SBATCH --requeue`); the requeued
#   job runs this script again, and `megagrow run` resumes from the last complete checkpoint.
# MEGAGROW_DRY_RUN=1 prints each stage's srun command line instead of running it.
run_plan() {  # run_plan PLAN RUN_DIR
  if [ -n "${MEGAGROW_DRY_RUN:-}" ]; then
    megagrow run "$1" --output "$2" --launcher slurm --dry-run
    return
  fi
  megagrow run "$1" --output "$2" --launcher slurm &
  local driver=$! rc=0
  trap 'kill -USR1 "$driver" 2>/dev/null' USR1 TERM
  while kill -0 "$driver" 2>/dev/null; do
    wait "$driver" && rc=0 || rc=$?
  done
  if [ "$rc" -eq 143 ]; then
    echo "stage saved on a signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
