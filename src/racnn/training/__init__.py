"""Training: the phase schedule, the loop, checkpoints and run set-up."""
