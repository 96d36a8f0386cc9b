"""Launchers: submit ``pipeline`` training and evaluation to SLURM (or locally) with submitit.

Only submission lives here; the work itself is the library's (``pipeline.train.entry``,
``pipeline.eval.evaluator``). Entry point: ``python -m launch.slurm {train,evaluate} ...``.
"""
