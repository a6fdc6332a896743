"""Heavy libraries imported on first use, so that help, version and the plugin listing never
pay for them.

torch, xarray and matplotlib take seconds to import, and every probe and renderer module
needs one of them. Listing plugins imports every plugin module, yet only reads names,
descriptions and parameter schemas. ``torch = lazy_import("torch")`` at module level reads
like the import it replaces; the library is imported the first time an attribute is read
(``torch.float32``), and each name read is kept, so later reads are plain attribute hits.

Third-party plugins use it the same way (``from probescope import lazy_import``). A name
read at import time (a default argument ``dtype=torch.float32``, a class deriving from a
library class) imports the library there and then: keep such reads inside functions.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule(ModuleType):
    """Stands for module ``name`` until an attribute is read, then imports it."""

    def __getattr__(self, attr: str):
        # Called only for attributes not yet in this object's __dict__: the first read of
        # a name imports the module (once; later it is a sys.modules lookup) and keeps the
        # value here, so every later read of that name is a plain attribute hit.
        if attr.startswith("__") and attr.endswith("__") and attr not in ("__version__", "__file__", "__path__"):
            raise AttributeError(attr)
        value = getattr(importlib.import_module(self.__name__), attr)
        self.__dict__[attr] = value
        return value

    def __reduce__(self):
        # Pickled as the import of the module it stands for: a function shipped by value
        # to a remote server (nnsight.register) carries its module's globals, lazy ones too.
        return (importlib.import_module, (self.__name__,))

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_import(name: str) -> ModuleType:
    """Module ``name``, imported when one of its attributes is first read.

    ``import matplotlib.colors as mcolors`` becomes ``mcolors = lazy_import("matplotlib.colors")``.
    A misspelt name fails at the first read with the usual ``ModuleNotFoundError``.
    """
    return LazyModule(name)
