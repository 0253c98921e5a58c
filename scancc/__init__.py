"""scancc: a hardware-portable compiler for state-space scans.

    import scancc
    k = scancc.compile("mamba2", target="reference", dt_softplus=True)
    y = k(x, dt, A, B, C, D=D)

See README.md and docs/ for the IR, the spec format and the backends.
"""
from scancc import ir  # noqa: F401  (scancc.ir is the folder ir/)

from .api import InputError, Kernel, compile
from .registry import Entry, RegistryError, get, names, register, unregister

# the standard library registers itself in the registry; importing it here (never from the
# registry) means it is registered before any user code can register a clashing name
from . import library  # noqa: E402,F401  isort: skip

__version__ = "0.1.0"

__all__ = ["compile", "Kernel", "InputError", "register", "unregister", "get", "names",
           "Entry", "RegistryError", "ir", "__version__"]
