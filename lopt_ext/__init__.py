"""lopt_ext: fused XLA FFI kernels for learned optimizers (small_fc_lopt, MLPLOpt, Celo) in JAX.

The package's layers are listed in lopt_ext/base.py."""
import pkgutil as _pkgutil

# Run from a source checkout after `pip install .`, this package is the checkout's
# lopt_ext/ (the current directory comes first on sys.path) while the compiled
# kernels live in the installed copy: let submodule imports look there too.
__path__ = _pkgutil.extend_path(__path__, __name__)
from lopt_ext import _ffi as _ffi  # noqa: E402
from lopt_ext.common import factored_dims, step_features  # noqa: E402
from lopt_ext.config import SmallFcLOpt, SmallFcLOptState  # noqa: E402
from lopt_ext.scaled import ScaledSmallFcLOpt, ScaledSmallFcLOptState  # noqa: E402
from lopt_ext.mlp_lopt import MLPLOpt, MLPLOptState  # noqa: E402
from lopt_ext.celo import Celo, CeloState  # noqa: E402
from lopt_ext.state import init_state  # noqa: E402
from lopt_ext.update import fused_update  # noqa: E402

__all__ = ["SmallFcLOpt", "ScaledSmallFcLOpt", "MLPLOpt", "MLPLOptState", "Celo", "CeloState", "SmallFcLOptState",
           "ScaledSmallFcLOptState", "fused_update", "init_state", "step_features", "factored_dims",
           "kernels_available"]
__version__ = "0.1.0"


def kernels_available() -> bool:
    """True when the compiled CPU kernels are importable."""
    return _ffi.available()
