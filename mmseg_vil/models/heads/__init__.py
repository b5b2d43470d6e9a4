try:
    from .vil_cls_head import ViLClsHead  # noqa: F401
except ImportError:  # without mmpretrain there is no classification head
    pass
