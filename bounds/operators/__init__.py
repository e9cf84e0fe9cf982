"""Curvature products of a network's loss: the operators the estimators reduce.

Each curvature is one operator, and the ways of computing its products are back ends of it (in
the spirit of curvlinops: one linear operator per curvature, the computation apart):

* the mean-loss Hessian H̄ = (1/N) Σ_n ∇²_W ℓ_n over selected layers, and its diagonal blocks
  H̄_ii — :mod:`~hessfine.bounds.operators.mean_loss` (double backward, batch by batch; a
  ``ProbeMap`` u ↦ H̄ u on per-layer tensors with a leading probe dimension);
* the per-example diagonal blocks H_ii(x_b) — :mod:`~hessfine.bounds.operators.per_example`.
  The interface is :class:`~hessfine.bounds.operators.per_example.PairHVP`: a callable
  ``products(names, blocks, members)`` that returns, layer by layer, [H_ii(x_b) u_p] for the
  (layer i, example b) pairs p of a Lanczos run — ``blocks[f]`` holds the (A_f, d_f) vectors of
  layer ``names[f]``'s pairs and ``members[f]`` their examples. Back ends:
  :class:`~hessfine.bounds.operators.per_example.VmappedPairHVP` (vmapped forward-over-reverse)
  and :class:`~hessfine.bounds.operators.retained.RetainedTail` (retained double-backward
  graphs, :mod:`~hessfine.bounds.operators.retained`); the front
  :class:`~hessfine.bounds.operators.per_example.PerExampleHVP` picks one per call by the
  retained-graph budget;
* the per-example Gauss–Newton blocks G_i(x) = J_iᵀ ∇²_z ℓ J_i, as forms v_iᵀ G_i v_i and traces
  Tr[G_i] — :mod:`~hessfine.bounds.operators.gauss_newton` (JVP/VJP back end and the fronts
  :class:`~hessfine.bounds.operators.gauss_newton.GaussNewtonForms` and
  :func:`~hessfine.bounds.operators.gauss_newton.gauss_newton_traces`) with the shared
  layer-input/output-gradient back end of Linear and Conv layers in
  :mod:`~hessfine.bounds.operators.layer_io`;
* when H_i(x) = G_i(x): the piecewise-linearity certificate,
  :mod:`~hessfine.bounds.operators.certification`.

Operators import only :mod:`hessfine.bounds.functional`, :mod:`hessfine.bounds.safe_autodiff`,
:mod:`hessfine.bounds.linalg` and each other; reductions over examples, probes and Lanczos runs
belong to :mod:`hessfine.bounds.estimators`.
"""
