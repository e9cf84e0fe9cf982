"""Deprecated path of :mod:`hessfine.analysis.model_specs` (see :mod:`hessfine.bounds.moved`)."""

from hessfine.bounds.moved import alias_module

alias_module(__name__, "hessfine.analysis.model_specs")
