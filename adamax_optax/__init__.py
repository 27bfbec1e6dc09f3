"""Keras-exact Adamax, with every Keras option, as pure-functional optax code.

>>> import jax.numpy as jnp, optax
>>> import adamax_optax
>>> tx = adamax_optax.adamax(learning_rate=0.5)
>>> params = jnp.array([1.0, 2.0, 3.0, 4.0])
>>> updates, state = tx.update(jnp.array([1.0, 6.0, 7.0, 2.0]), tx.init(params))
>>> optax.apply_updates(params, updates).round(4)  # epsilon moves the 7th digit
Array([0.5, 1.5, 2.5, 3.5], dtype=float32)
"""

from importlib.metadata import PackageNotFoundError, version

from adamax_optax._accumulation import (
    AccumulateGradientsState as AccumulateGradientsState,
)
from adamax_optax._accumulation import accumulate_gradients as accumulate_gradients
from adamax_optax._adamax import ScaleByKerasAdamaxState as ScaleByKerasAdamaxState
from adamax_optax._adamax import scale_by_keras_adamax as scale_by_keras_adamax
from adamax_optax._alias import adamax as adamax
from adamax_optax._chain import chain as chain
from adamax_optax._chain import named_chain as named_chain
from adamax_optax._clipping import keras_clipnorm as keras_clipnorm
from adamax_optax._clipping import keras_clipvalue as keras_clipvalue
from adamax_optax._clipping import keras_global_clipnorm as keras_global_clipnorm
from adamax_optax._config import from_config as from_config
from adamax_optax._config import get_config as get_config
from adamax_optax._dynamic_loss_scale import (
    DynamicLossScaleState as DynamicLossScaleState,
)
from adamax_optax._dynamic_loss_scale import dynamic_loss_scale as dynamic_loss_scale
from adamax_optax._ema import ParameterEMAState as ParameterEMAState
from adamax_optax._ema import finalize_variable_values as finalize_variable_values
from adamax_optax._ema import parameter_ema as parameter_ema
from adamax_optax._learning_rate import (
    ScaleByKerasLearningRateState as ScaleByKerasLearningRateState,
)
from adamax_optax._learning_rate import (
    scale_by_keras_learning_rate as scale_by_keras_learning_rate,
)
from adamax_optax._loss_scale import UnscaleGradientsState as UnscaleGradientsState
from adamax_optax._loss_scale import unscale_gradients as unscale_gradients
from adamax_optax._migration import migrate_state as migrate_state
from adamax_optax._sharding import state_shardings as state_shardings
from adamax_optax._skip_nonfinite import SkipNonfiniteState as SkipNonfiniteState
from adamax_optax._skip_nonfinite import skip_nonfinite as skip_nonfinite
from adamax_optax._state import get_iterations as get_iterations
from adamax_optax._state import get_learning_rate as get_learning_rate
from adamax_optax._state import get_loss_scale as get_loss_scale
from adamax_optax._state import get_skipped_steps as get_skipped_steps
from adamax_optax._state import has_updated as has_updated
from adamax_optax._stochastic_rounding import (
    stochastic_rounding as stochastic_rounding,
)
from adamax_optax._weight_decay import decoupled_weight_decay as decoupled_weight_decay
from adamax_optax.keras import from_keras_config as from_keras_config
from adamax_optax.keras import from_keras_optimizer as from_keras_optimizer
from adamax_optax.keras import to_keras_optimizer as to_keras_optimizer

try:
    __version__ = version("adamax_optax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AccumulateGradientsState",
    "DynamicLossScaleState",
    "ParameterEMAState",
    "ScaleByKerasAdamaxState",
    "ScaleByKerasLearningRateState",
    "SkipNonfiniteState",
    "UnscaleGradientsState",
    "__version__",
    "accumulate_gradients",
    "adamax",
    "chain",
    "decoupled_weight_decay",
    "dynamic_loss_scale",
    "finalize_variable_values",
    "from_config",
    "from_keras_config",
    "from_keras_optimizer",
    "get_config",
    "get_iterations",
    "get_learning_rate",
    "get_loss_scale",
    "get_skipped_steps",
    "has_updated",
    "keras_clipnorm",
    "keras_clipvalue",
    "keras_global_clipnorm",
    "migrate_state",
    "named_chain",
    "parameter_ema",
    "scale_by_keras_adamax",
    "scale_by_keras_learning_rate",
    "skip_nonfinite",
    "state_shardings",
    "stochastic_rounding",
    "to_keras_optimizer",
    "unscale_gradients",
]
