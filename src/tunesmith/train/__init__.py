"""Training: the one loop (engine), its checkpoints, and one file per method."""
