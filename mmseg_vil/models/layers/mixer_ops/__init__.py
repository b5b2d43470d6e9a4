"""Fused stages of the ViL mixer around the mLSTM cell (see :mod:`.reference` for what they compute)."""
from .reference import conv_qkv, gated_output

__all__ = ['conv_qkv', 'gated_output']
