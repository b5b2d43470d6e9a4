"""Dataset utilities: synthetic ADE20K, Cityscapes and ImageNet stand-ins for the demo and the tests (the real
datasets are read by mmseg / mmpretrain themselves), and the ImageNet recipe's transforms that MMPretrain lacks."""
from .synthetic_ade20k import generate_ade20k
from .synthetic_cityscapes import generate_cityscapes
from .synthetic_imagenet import generate_imagenet

try:
    from .transforms import ThreeAugment  # noqa: F401  (registers it in mmpretrain's TRANSFORMS)
except ImportError:  # without mmpretrain there is no classification recipe
    pass

__all__ = ['generate_ade20k', 'generate_cityscapes', 'generate_imagenet']
