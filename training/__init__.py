"""Multi-exit training recipes (installed as ``eeengine.training``)."""

from eeengine.training.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
