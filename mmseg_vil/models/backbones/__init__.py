
from .vil import ViL  # noqa: F401
from .vim import Vim  # noqa: F401
