"""The training engine: the loop, checkpoints, run directories, batching and schedules.

* :mod:`nestrnn.engine.trainer`: :class:`Trainer` (truncated BPTT, clipping, evaluation, best
  checkpoint, early stopping, exact resume) and :func:`evaluate`;
* :mod:`nestrnn.engine.rundir`: the run directory, atomic checkpoints, RNG capture, environment;
* :mod:`nestrnn.engine.batching`: random-access batching (LM streams, shuffled examples);
* :mod:`nestrnn.engine.schedule`: optimizers and the learning-rate schedule;
* :mod:`nestrnn.engine.distributed`: the process topology (where DDP plugs in);
* :mod:`nestrnn.engine.loading`: rebuilding a run's task and model for ``eval`` and ``sample``.
"""
