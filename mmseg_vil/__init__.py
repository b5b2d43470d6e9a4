"""mmseg-vil: Vision-LSTM (ViL) for MMSegmentation and MMPretrain.

Importing the package applies :mod:`mmseg_vil.compat` and registers every model, optimizer constructor and hook.
Use it from a config with ``custom_imports = dict(imports=['mmseg_vil'], allow_failed_imports=False)``.
"""
from . import compat

compat.apply()

from . import datasets, models  # noqa: E402  (registration after the compat fixes)
from . import engine  # noqa: E402  (optimizer constructor, CPU data-parallel wrapper)
from .version import __version__  # noqa: E402

__all__ = ['__version__', 'compat', 'datasets', 'engine', 'models']
