"""emascope agent: a bank of many EMA decays of a model's weights, attached to a training job."""

__version__ = "0.1.0"

from agent.bank import DEFAULT_DECAYS, EMABank  # noqa: E402, F401
from agent.ema_math import BEMAConfig, parse_variant, variant_name  # noqa: E402, F401
from agent.scope import Scope, attach  # noqa: E402, F401
