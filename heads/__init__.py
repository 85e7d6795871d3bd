"""Stage two: heads trained on cached features (torch only; never imports ``pipeline``).

Four wings and two bottom modules; imports point one way, down this list (``docs/architecture.md``):

- ``commands.py``, ``commands_runs.py`` — the CLI face of stage two (typer): the training commands,
  and those that read runs (report, runs, predict, methods), delegating to the wings below;
- ``sweeps/`` — many runs: the sweep runner and its workers, stacked GPU training, grids, comparisons,
  robustness;
- ``train/`` — one run: its configuration and options, the trainer, evaluation, its run folder;
- ``methods/`` — one short module per balancing method, and their registry;
- ``blocks/`` — what runs and methods are built from: splits and batches, standardisation, the shared
  modules, optimizers and schedules, devices;
- ``reports/`` — tables, paper tables and figures from result dicts; imports nothing that trains;
- ``metrics.py`` and ``errors.py`` — pure numbers, and the one user-facing error type.
"""
