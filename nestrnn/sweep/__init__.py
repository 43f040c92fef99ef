"""Hyper-parameter sweeps on Optuna: the spec (:mod:`.spec`) and the worker that trains each
(trial, seed) as an ordinary run directory (:mod:`.worker`). Imported only by ``nestrnn sweep``."""
