"""Scripts that read a run's files: plots, lineage, generate, evaluate, summary (see README)."""
