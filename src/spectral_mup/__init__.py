"""spectral-mup: zero-shot hyperparameter transfer (μP) for every LLM optimizer, across
width and depth, from the spectral condition for feature learning."""

from .coord import coord_check
from .errors import ConfigError, DataError, SmupError
from .optim import build_optimizer
from .parametrize import Parametrization, init_weights, param_groups, parametrize
from .probe import probe
from .roles import ParamRole, infer_roles, load_shapes, register_layout, save_shapes

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ParamRole",
    "Parametrization",
    "SmupError",
    "__version__",
    "build_optimizer",
    "coord_check",
    "infer_roles",
    "init_weights",
    "load_shapes",
    "param_groups",
    "parametrize",
    "probe",
    "register_layout",
    "save_shapes",
]
