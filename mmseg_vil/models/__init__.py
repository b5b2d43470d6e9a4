from . import backbones, heads, layers, necks  # noqa: F401  (registers the models)
