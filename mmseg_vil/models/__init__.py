from . import backbones, heads, layers  # noqa: F401  (registers the models)
