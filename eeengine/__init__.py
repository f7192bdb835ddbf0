"""eeengine: an inference engine for early-exit transformer encoders.

>>> import eeengine
>>> eeengine.Engine(ckpt).predict("a gorgeous, witty film")
"""

from eeengine.checkpoint import CheckpointError
from eeengine.engine import Engine, Prediction

__all__ = ["CheckpointError", "Engine", "Prediction"]
__version__ = "0.1.0"
