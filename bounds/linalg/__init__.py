"""Numerical linear algebra on operators given as products, and the random draws it needs.

Nothing here knows about networks: an operator is a function that maps a block of vectors to
their images (the products of :mod:`hessfine.bounds.operators`), and a result is a tensor.

* :mod:`~hessfine.bounds.linalg.lanczos` — batched Lanczos tridiagonalisation with full
  reorthogonalisation, Gauss quadrature uᵀ f(H) u and Ritz values with residual bounds;
* :mod:`~hessfine.bounds.linalg.positive_quadrature` — uᵀ H⁺ u by the Gauss–Radau rule with a
  node at 0, run adaptively per member and aimed at the maximum over members;
* :mod:`~hessfine.bounds.linalg.probes` — Rademacher probes and generators keyed by what they
  draw for, so that no result depends on how the work is batched or split;
* :mod:`~hessfine.bounds.linalg.sharding` — one process's share of a batch stream and the sum
  over processes.

The modules import only :mod:`hessfine.bounds.functional` (for the ``Batch`` type) and each other.
"""
