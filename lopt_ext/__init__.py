"""lopt_ext: fused XLA FFI kernels for learned optimizers (small_fc_lopt, MLPLOpt, Celo) in JAX."""
import pkgutil as _pkgutil

# Run from a source checkout after `pip install .`, this package is the checkout's
# lopt_ext/ (the current directory comes first on sys.path) while the compiled
# kernels live in the installed copy: let submodule imports look there too.
__path__ = _pkgutil.extend_path(__path__, __name__)
from lopt_ext.config import SmallFcLOpt, step_features, factored_dims
from lopt_ext.scaled import ScaledSmallFcLOpt
from lopt_ext.mlp_lopt import MLPLOpt, MLPLOptState
from lopt_ext.celo import Celo, CeloState
from lopt_ext.state import ScaledSmallFcLOptState, SmallFcLOptState, init_state
from lopt_ext.update import fused_update

__all__ = ["SmallFcLOpt", "ScaledSmallFcLOpt", "MLPLOpt", "MLPLOptState", "Celo", "CeloState", "SmallFcLOptState", "ScaledSmallFcLOptState", "fused_update", "init_state", "step_features",
           "factored_dims", "kernels_available"]
__version__ = "0.1.0"


def kernels_available() -> bool:
    """True when the compiled CPU kernels are importable."""
    from lopt_ext import _ffi
    return _ffi.available()
