"""Estimators: reductions of curvature products over examples, probes and Lanczos runs.

* :mod:`~hessfine.bounds.estimators.quadratic_forms` — per layer, the max / mean / argmax over
  examples of v_iᵀ M(x) v_i (M = H_i, G_i or H_i⁺), the quantity of Ju, Li & Zhang's bound;
* :mod:`~hessfine.bounds.estimators.traces` — the mean trace Tr[H̄_ii] (Hutchinson, Hutch++,
  output-space probes, exact Gauss–Newton) and max_n Tr[H_i⁺(x_n)];
* :mod:`~hessfine.bounds.estimators.spectra` — top eigenvalues and the eigenvalue density;
* :mod:`~hessfine.bounds.estimators.noise_stability` — E_U[ℓ̄(W+U)] − ℓ̄(W) by Monte Carlo.

Each returns the result types of :mod:`hessfine.bounds.estimates`. An estimator uses
:mod:`hessfine.bounds.operators`, :mod:`hessfine.bounds.linalg`, the result types,
:mod:`hessfine.bounds.functional` and :mod:`hessfine.bounds.safe_autodiff`, and never another
estimator: what one needs from another (which layers are certified, a trace) comes in as an
argument.
"""
