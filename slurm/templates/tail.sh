wait_step; RC=$?
if [ "$PREEMPTED" = 1 ]; then
  echo "trellis: ranks exited with $RC after the warning signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "trellis: ranks exited with $RC"
exit $RC
