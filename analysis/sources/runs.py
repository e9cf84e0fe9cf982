"""Deprecated path of :mod:`hessfine.analysis.sources.run_collections` (see :mod:`hessfine.bounds.moved`)."""

from hessfine.bounds.moved import alias_module

alias_module(__name__, "hessfine.analysis.sources.run_collections")
