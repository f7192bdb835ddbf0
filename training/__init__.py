"""Multi-exit training recipes (installed as ``eeengine.training``)."""

from eeengine.training.config import TrainConfig
from eeengine.training.trainer import train

__all__ = ["TrainConfig", "train"]
