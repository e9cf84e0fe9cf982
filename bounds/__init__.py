"""hessfine.bounds: the mathematics on functional models. No file I/O, no command line, no plotting.

:mod:`~hessfine.bounds.operators` computes curvature products of a network's loss,
:mod:`~hessfine.bounds.linalg` the Lanczos and probe routines that reduce them, and
:mod:`~hessfine.bounds.estimators` the measured quantities (quadratic forms, traces, spectra,
noise stability), returned as the result types of :mod:`~hessfine.bounds.estimates`. The bounds
themselves are in :mod:`~hessfine.bounds.generalization` and :mod:`~hessfine.bounds.pac_bayes`;
networks are seen as functions of their parameters through :mod:`~hessfine.bounds.functional`.
"""
