"""Old import paths of renamed and split modules, kept for one version.

A module that was renamed leaves a two-line file at its old path that calls
:func:`alias_module`: importing the old path then warns (``DeprecationWarning``) and gives the
new module itself, so every name — classes included, with their identity — stays reachable under
the old path until the version named in the warning. A module whose contents went to several
new modules leaves a file that imports its former public names from their new places and calls
:func:`warn_moved`.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     import hessfine.analysis.models as old
    >>> old.__name__, caught[0].category.__name__
    ('hessfine.analysis.model_specs', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import sys
import warnings

RENAMED_IN = "0.2.0"
REMOVED_IN = "0.3.0"


def warn_moved(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that module ``old`` is deprecated in favour of ``new`` (called by the old module;
    the warning points at the code that imported it)."""
    warnings.warn(
        f"{old} is deprecated: import {new} (moved in hessfine {RENAMED_IN}; "
        f"the old path goes in {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def alias_module(old: str, new: str) -> None:
    """Make ``old`` (the module being imported) the module ``new``, with a deprecation warning.

    The import system returns what ``sys.modules[old]`` holds once the old module's code has run,
    so replacing that entry makes ``import old`` and ``from old import name`` give ``new``.
    """
    warn_moved(old, new, stacklevel=4)
    sys.modules[old] = importlib.import_module(new)
