"""One run: its configuration (``config.py``) and a method's options (``options.py``), the trainer with
its epoch loop, selection on validation and checkpoints (``trainer.py``), evaluation of every modality
subset (``evaluation.py``), and the run folder it writes and is reloaded from (``rundir.py``).

May import: ``heads.methods``, ``heads.blocks``, ``heads.reports`` (to write a run's table),
``heads.metrics``, ``heads.errors`` and ``cache``; never ``heads.sweeps``, which builds on it.
"""
