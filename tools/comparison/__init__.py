"""tools/compare.py in parts: plan (strategies, seeds, phases), run (the trainer subprocesses),
results (each run's numbers, read from its files), committed (a study's kept rows), declared
(primaries and margin, fixed before running), comparisons and stats (paired tests, Holm, TOST),
seeds (planning how many seeds), report (markdown, curves)."""
