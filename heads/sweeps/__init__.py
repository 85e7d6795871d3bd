"""Many runs: method specs and seeds (``specs.py``), one run as a job that trains to an epoch and
checkpoints or finishes (``jobs.py``), worker processes (``workers.py``) or Ray tasks over several
machines (``backends.py``), stacked GPU training of runs
that share their shapes (``stacked.py``, ``stacked_optim.py``), the runner that plans, prunes and
resumes a sweep (``sweep.py``), and the sweeps users run: grids with their axes and selection
(``axes.py``, ``grid.py``), comparisons (``compare.py``) and robustness
(``robustness.py``); a sweep's runs in the trackers, grouped by sweep (``tracking.py``).

May import: ``heads.train`` and everything below it, and ``heads.reports`` to write tables.
"""
