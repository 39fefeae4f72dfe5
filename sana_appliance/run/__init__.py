"""One training run: preflight checks, the output lock, the training loop (train), checkpoints,
validation images, the export of final/, and run.json (runinfo).
"""
