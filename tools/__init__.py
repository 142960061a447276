"""Scripts that read a run's files: plots, lineage, generate, evaluate, summary (see README).

What they share, by job: cli.py (notes, `guard`, --device), runfiles.py (finding a run's
folder and config), csvlogs.py (reading its CSV logs), plotting.py (figures), checkpoints.py
(a checkpoint -> a model).
"""
