"""One training run: preflight checks, the output lock, the training loop (train) around the
step function (step) and the checkpointed state (state), checkpoints, validation images, the
export of final/, and run.json (runinfo).
"""
