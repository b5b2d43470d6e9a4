
from .vil import ViL  # noqa: F401
