"""
Application extensions: C{module.path:function} names (UNREALON_EXTENSIONS)
turned into the callables that add methods to a node's registry.

One loader for the node (L{unrealon.tap}) and the client generator
(L{unrealon.codegen}), so a bad name fails the same way in both: with the
real cause (the module that is missing, the error the import raised), not
just "cannot load".
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Iterable
from typing import Any

#: a callable adding an application's own methods to the registry
Extension = Callable[[Any], None]


class ExtensionError(Exception):
    """An extension named in the settings cannot be loaded; the message says why."""


def load_extension(spec: str) -> Extension:
    """C{"package.module:function"} -> the registry extension it names, or L{ExtensionError}."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExtensionError(f"{spec!r} is not module.path:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = f" (module {e.name!r} is missing)" if e.name else ""
        raise ExtensionError(
            f"cannot import {module_name}: {type(e).__name__}: {e}{missing}"
        ) from None
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise ExtensionError(
            f"importing {module_name} raised {type(e).__name__}: {e} "
            f"({where.filename}, line {where.lineno})"
        ) from None
    found = getattr(module, attr, None)
    if found is None:
        raise ExtensionError(f"{module_name} has no {attr}")
    if not callable(found):
        raise ExtensionError(f"{spec} is not callable")
    extension: Extension = found
    return extension


def load_extensions(specs: Iterable[str]) -> tuple[Extension, ...]:
    return tuple(load_extension(spec) for spec in specs)
