"""The building blocks that runs and methods are made of: cached features as split tensors and
batches (``data.py``) with their fixed evaluation order (``order.py``), standardisation with training
statistics (``standardize.py``), the shared torch modules (``modules.py``), optimizers, schedules and
the training settings methods declare (``optim.py``), device and precision (``device.py``), the
domains every number is declared in (``domains.py``) and progress with rate and ETA (``progress.py``).

May import: ``cache`` (to read a cache), ``heads.metrics``, ``heads.errors`` and each other, in that
order of files; never ``heads.methods``, ``heads.train``, ``heads.sweeps`` or ``heads.reports``.
"""
