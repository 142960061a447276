"""Scripts that read a run's files: plots, lineage, generate, evaluate, summary (see README), and
the few that train in their own process (bench and gpu_check through tools/harness.py; soak; compare
runs the trainer per strategy and seed).

What the readers share, by job: cli.py (notes, `guard`, --device), runfiles.py (finding a run's
folder and config), csvlogs.py (reading its CSV logs), plotting.py (figures), checkpoints.py
(a checkpoint -> a model).
"""
