"""Deprecated path of :mod:`hessfine.finetune.digit_networks` (see :mod:`hessfine.bounds.moved`)."""

from hessfine.bounds.moved import alias_module

alias_module(__name__, "hessfine.finetune.digit_networks")
