"""hessfine.figures: paper-style plots drawn from result tables only (no torch).

:mod:`hessfine.figures.tables` reads the tables written by ``hessfine compare`` (``comparison.csv``,
``layers.csv``, ``noise_stability.csv``) and turns ``measurement.json`` documents into the long
tables; :mod:`hessfine.figures.plots` draws the figures of Ju, Li & Zhang (ICML 2022) from them —
:func:`hessfine.figures.plots.draw_all` writes every figure the tables support.
"""
