"""mmseg-vil: Vision-LSTM (ViL) for MMSegmentation and MMPretrain.

Importing the package applies :mod:`mmseg_vil.compat`, registers every model, optimizer constructor and hook, and
makes the configs findable by name (:mod:`mmseg_vil.model_zoo`).
Use it from a config with ``custom_imports = dict(imports=['mmseg_vil'], allow_failed_imports=False)``.
"""
from . import compat

compat.apply()

from . import datasets, models  # noqa: E402  (registration after the compat fixes)
from . import engine  # noqa: E402  (optimizer constructor, CPU data-parallel wrapper)
from . import model_zoo  # noqa: E402
from .registry import MMPRETRAIN_MODELS  # noqa: E402
from .version import __version__  # noqa: E402

model_zoo.register_in_inferencers()
if MMPRETRAIN_MODELS is not None:
    model_zoo.register_in_mmpretrain()

__all__ = ['__version__', 'compat', 'datasets', 'engine', 'model_zoo', 'models']
