"""Scripts that read a run's files (plots, lineage, generate, evaluate, summary: tools/_common.py), and
the few that train in their own process (bench and gpu_check through tools/harness.py; soak; compare
runs the trainer per strategy and seed) (see README)."""
