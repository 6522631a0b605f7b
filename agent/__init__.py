"""emascope agent: a bank of many EMA decays of a model's weights, attached to a training job."""

__version__ = "0.1.0"
