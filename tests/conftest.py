import mmseg_vil  # noqa: F401  (applies the compat fixes and registers the models before any test imports mmseg)
