"""Deprecated path of :mod:`hessfine.bounds.operators.mean_loss` (see
:mod:`hessfine.bounds.moved`)."""

from hessfine.bounds.moved import alias_module

alias_module(__name__, "hessfine.bounds.operators.mean_loss")
