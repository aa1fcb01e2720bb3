"""spectral-mup: zero-shot hyperparameter transfer (μP) for every LLM optimizer, across
width and depth, from the spectral condition for feature learning."""

from .errors import ConfigError, DataError, SmupError
from .optim import build_optimizer
from .parametrize import Parametrization, init_weights, param_groups, parametrize
from .roles import ParamRole, infer_roles, register_layout

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ParamRole",
    "Parametrization",
    "SmupError",
    "__version__",
    "build_optimizer",
    "infer_roles",
    "init_weights",
    "param_groups",
    "parametrize",
    "register_layout",
]
