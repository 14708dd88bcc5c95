"""l2b_fast: fast Learning-to-Branch layers for multi-task networks (Guo, Lee, Ulbricht, ICML 2020)."""

from l2b_fast import backends, ops
from l2b_fast.backends import BackendUnavailableError, FallbackWarning

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "FallbackWarning", "backends", "ops", "__version__"]
