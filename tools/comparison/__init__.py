"""tools/compare.py in parts: plan (strategies, seeds, phases), run (the trainer subprocesses),
results (each run's numbers, read from its files), stats (Student t), report (markdown, curves)."""
