"""One run: its configuration (``config.py``) and a method's options (``options.py``), the trainer with
its epoch loop, selection on validation and checkpoints (``trainer.py``), evaluation of every modality
subset (``evaluation.py``), the run folder it writes and is reloaded from (``rundir.py``), the
trackers it logs to (``tracking.py``), rerunning it from a config file (``configfile.py``) and a
saved run's per-sample predictions (``predictions.py``).

May import: ``heads.methods``, ``heads.blocks``, ``heads.reports`` (to write a run's table),
``heads.metrics``, ``heads.errors`` and ``cache``; never ``heads.sweeps``, which builds on it.
"""
