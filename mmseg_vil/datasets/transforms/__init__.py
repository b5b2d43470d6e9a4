"""Data transforms of the Vision-LSTM ImageNet recipe that MMPretrain lacks (registered in its TRANSFORMS)."""
from .three_augment import ThreeAugment

__all__ = ['ThreeAugment']
