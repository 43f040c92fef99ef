"""The training engine: the loop, checkpoints, run directories, batching, schedules, launching.

* :mod:`nestrnn.engine.trainer`: :class:`Trainer` (truncated BPTT, clipping, evaluation, best
  checkpoint, early stopping, exact resume, clean stops) and :func:`evaluate`;
* :mod:`nestrnn.engine.build`: the task and model of a configuration (their argument errors as
  one-line config errors);
* :mod:`nestrnn.engine.resources`: whether a run fits in memory, decided before it starts;
* :mod:`nestrnn.engine.rundir`: the run directory, atomic checkpoints, RNG capture, environment;
* :mod:`nestrnn.engine.lock`: one writer per run directory (``flock``);
* :mod:`nestrnn.engine.stopping`: SIGTERM and SIGINT as requests to stop after the current step;
* :mod:`nestrnn.engine.batching`: random-access batching (LM streams, shuffled examples);
* :mod:`nestrnn.engine.schedule`: optimizers and the learning-rate schedule;
* :mod:`nestrnn.engine.distributed`: the process topology (where DDP plugs in);
* :mod:`nestrnn.engine.launch`: what a run is (new or resumed, where) and ``--nproc`` under
  torchrun (:mod:`nestrnn.engine.torchrun`: torchrun's ending made quiet);
* :mod:`nestrnn.engine.loading`: rebuilding a run's task and model for ``eval``, ``sample`` and
  ``viz``.
"""
