"""Vision-LSTM (ViL) backbone, numerically identical to the official ``VisionLSTM2`` and ``VisionLSTM`` (v1) models
(Alkin et al., 2024).

An isotropic stack of mLSTM blocks over 16x16 patch tokens; even blocks traverse the tokens from the top-left, odd
blocks from the bottom-right. ``out_indices`` count mLSTM blocks (24 in the VisionLSTM2 presets, i.e. 12 official
block pairs). :mod:`.vil_options` translates the official constructor arguments into the arguments here.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.utils import to_2tuple
from torch import Tensor, nn

from ...registry import register_model
from ...utils.checkpoint import load_state_dict_strictly, read_state_dict
from ..layers.norm_ops import fuses_adds
from ..layers.pos_embed import resample_grid_pos_embed
from ..layers.vil_block import Update, ViLBlock, add_update
from .isotropic import pad_to_patches, resolve_out_indices
from .vil_checkpoint import V1_CONV_KERNEL_SIZE, convert_vil_state_dict, split_backbone_and_head

OUT_TYPES = ('featmap', 'raw', 'pooled', 'avg_pooled')


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gradient of a channel-first feature map reaches
    the tokens transposed, and every block's residual adds and products would otherwise run on those strides."""

    @staticmethod
    def forward(ctx, tokens: Tensor) -> Tensor:
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()
DROP_PATH_DECAYS = ('none', 'blocks', 'pairs')
INIT_SCHEMES = ('original', 'original-fixed')
# The v1 models (official ``VisionLSTM``, released ``vil_*16_*.th``): causal 1-D conv of kernel 4, no biases.
V1_MIXER = dict(conv_kind='causal1d', conv_kernel_size=V1_CONV_KERNEL_SIZE, proj_bias=False, norm_bias=False)


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks, its own or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


@register_model
class ViL(BaseModule):
    """Vision-LSTM backbone for MMSegmentation and MMPretrain.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``/``'s'``/``'b'``) for the VisionLSTM2 models,
            ``'v1-tiny'``, ``'v1-tinyplus'``, ``'v1-small'``, ``'v1-smallplus'``, ``'v1-base'`` for the v1 models, or
            a dict with ``embed_dims`` and ``num_layers`` (number of mLSTM blocks) and optionally ``num_heads``,
            ``expansion``, ``qkv_block_size``, ``conv_kind`` (``'2d'`` or ``'causal1d'``), ``conv_kernel_size``,
            ``proj_bias``, ``norm_bias`` (biases of the projections / of all LayerNorms).
        img_size: build resolution; sets the grid ``img_size // patch_size`` of the learnable position embedding.
            Other input sizes work: the embedding is resampled (bicubic) at run time, and at load time when a
            checkpoint's grid differs.
        patch_size: patch size of the patch embedding.
        patch_stride: stride of the patch embedding, ``patch_size`` if None; a smaller stride gives overlapping
            patches (the official ``stride``, 8 in the ``*-stride8`` models) and a grid of ``(H - p) // s + 1``.
        in_channels: input channels.
        out_indices: mLSTM blocks whose outputs are returned (negative values count from the end). The default
            (7, 11, 15, 23) is the official UperNet setting.
        out_type: ``'featmap'`` (NCHW maps), ``'raw'`` (``(B, N, D)`` tokens, row-major), ``'pooled'``
            (``(B, 2D)`` concatenation of the first and last token: official ``pooling='bilateral_flatten'``) or
            ``'avg_pooled'`` (``(B, D)`` mean of the first and last token: ``'bilateral_avg'``, the v1 models).
        final_norm: apply the final LayerNorm to the output of the last block. The official segmentation models
            use raw block outputs (False); the classifiers use it (True).
        final_norm_eps: its epsilon: 1e-6 in VisionLSTM2; 1e-5 in v1 (its ``legacy_norm``).
        out_norm: apply a second, plain LayerNorm after the final norm to ``featmap``/``raw`` outputs of the last
            block: the official feature modes end with one (VisionLSTM2 ``legacy_norm``; v1 ``norm``).
        out_norm_eps: its epsilon: 1e-5 in VisionLSTM2, 1e-6 in v1.
        drop_path_rate: stochastic-depth rate of the last block (every block if ``drop_path_decay`` is off).
        drop_path_decay: ``'blocks'`` (or True): rates grow linearly from 0 over the blocks (the official training
            code and v1); ``'pairs'``: linearly over block pairs, both blocks of a pair sharing one
            (VisionLSTM2's ``drop_path_decay=True``); ``'none'`` (or False): every block uses ``drop_path_rate``.
        init_scheme: ``'original'`` (the released models) or ``'original-fixed'`` (down-projections initialised
            with the number of blocks, official fix of issue #20); see :class:`~..layers.vil_block.MLSTMMixer`.
        with_cp: gradient checkpointing of each block while training (saves memory, costs a recomputation).
        mlstm_backend: mLSTM cell backend (see :mod:`mmseg_vil.models.layers.mlstm`).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])`` loads a released ``.th`` file, a
            ``VisionLSTM2``/``VisionLSTM`` state dict or a checkpoint of this package strictly; otherwise the
            official init.
    """

    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=192, num_layers=24)),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=384, num_layers=24)),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=768, num_layers=24)),
        'v1-tiny': dict(embed_dims=192, num_layers=24, **V1_MIXER),
        'v1-tinyplus': dict(embed_dims=192, num_layers=29, **V1_MIXER),
        'v1-small': dict(embed_dims=384, num_layers=24, **V1_MIXER),
        'v1-smallplus': dict(embed_dims=384, num_layers=26, **V1_MIXER),
        'v1-base': dict(embed_dims=768, num_layers=24, **V1_MIXER),
    }
    arch_defaults = dict(num_heads=4, expansion=2, qkv_block_size=4, conv_kind='2d', conv_kernel_size=3,
                         proj_bias=True, norm_bias=True)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 img_size: Union[int, Sequence[int]] = 224,
                 patch_size: int = 16,
                 patch_stride: Optional[int] = None,
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (7, 11, 15, 23),
                 out_type: str = 'featmap',
                 final_norm: bool = False,
                 final_norm_eps: float = 1e-6,
                 out_norm: bool = False,
                 out_norm_eps: float = 1e-5,
                 drop_path_rate: float = 0.0,
                 drop_path_decay: Union[bool, str] = True,
                 init_scheme: str = 'original',
                 with_cp: bool = False,
                 mlstm_backend: str = 'auto',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = self.arch_settings['embed_dims']
        self.num_layers = self.arch_settings['num_layers']
        self.patch_size = patch_size
        self.patch_stride = patch_size if patch_stride is None else patch_stride
        self.in_channels = in_channels
        if out_type not in OUT_TYPES:
            raise ValueError(f'out_type={out_type!r} is not supported; choose one of {OUT_TYPES}')
        if out_norm and out_type not in ('featmap', 'raw'):
            raise ValueError(f"out_norm=True normalises 'featmap'/'raw' outputs, not out_type={out_type!r}: the "
                             'pooled features get their LayerNorm in the classifier head (ViLClsHead)')
        if init_scheme not in INIT_SCHEMES:
            raise ValueError(f'init_scheme={init_scheme!r} is not supported; choose one of {INIT_SCHEMES}')
        if not 0 < self.patch_stride <= patch_size:
            raise ValueError(f'patch_stride={patch_stride} must lie in [1, patch_size={patch_size}]: a larger stride '
                             'would skip pixels')
        self.out_type = out_type
        self.out_indices = resolve_out_indices(out_indices, self.num_layers, 'mLSTM blocks')
        self.final_norm = final_norm
        self.with_cp = with_cp

        self.patch_embed = nn.Conv2d(in_channels, self.embed_dims, patch_size, stride=self.patch_stride)
        # The official grid of the embedding is the image in whole patches, also for overlapping patches.
        grid = tuple(s // patch_size for s in to_2tuple(img_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, self.embed_dims))
        rates = self._drop_path_rates(drop_path_rate, drop_path_decay)
        mixer_kwargs = {k: self.arch_settings[k] for k in self.arch_defaults}
        init_num_blocks = self.num_layers if init_scheme == 'original-fixed' else 1
        self.layers = nn.ModuleList(
            ViLBlock(self.embed_dims, reverse=bool(i % 2), drop_path=rates[i], mlstm_backend=mlstm_backend,
                     init_num_blocks=init_num_blocks, **mixer_kwargs) for i in range(self.num_layers))
        norm_bias = self.arch_settings['norm_bias']
        self.norm = nn.LayerNorm(self.embed_dims, eps=final_norm_eps, bias=norm_bias) if final_norm else None
        self.out_norm = nn.LayerNorm(self.embed_dims, eps=out_norm_eps) if out_norm else None
        self._register_load_state_dict_pre_hook(self._resample_loaded_pos_embed)
        self.reset_parameters()

    def _drop_path_rates(self, rate: float, decay: Union[bool, str]) -> Sequence[float]:
        decay = {True: 'blocks', False: 'none'}.get(decay, decay)
        if decay not in DROP_PATH_DECAYS:
            raise ValueError(f'drop_path_decay={decay!r} is not supported; choose one of {DROP_PATH_DECAYS} '
                             '(True means blocks, False none)')
        if decay == 'none':
            return [rate] * self.num_layers
        if decay == 'blocks':
            return torch.linspace(0, rate, self.num_layers, device='cpu').tolist()
        pair_rates = torch.linspace(0, rate, (self.num_layers + 1) // 2, device='cpu').tolist()
        return [pair_rates[i // 2] for i in range(self.num_layers)]

    def _parse_arch(self, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(f'Unknown ViL arch {arch!r}; choose one of {sorted(set(self.arch_zoo))} '
                                 'or pass a dict with embed_dims and num_layers')
            arch = self.arch_zoo[arch.lower()]
        missing = {'embed_dims', 'num_layers'} - set(arch)
        if missing:
            raise ValueError(f'ViL arch dict {arch} lacks {sorted(missing)}')
        unknown = set(arch) - {'embed_dims', 'num_layers'} - set(self.arch_defaults)
        if unknown:
            raise ValueError(f'ViL arch dict {arch} has unknown keys {sorted(unknown)}; known: embed_dims, '
                             f'num_layers, {", ".join(self.arch_defaults)}')
        return {**self.arch_defaults, **arch}

    def reset_parameters(self) -> None:
        """The official initialisation (vil_spec.md §3)."""
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.embed_dims, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in self.layers:
            layer.norm.reset_parameters()
            layer.mixer.reset_parameters()
        for norm in (self.norm, self.out_norm):
            if norm is not None:
                norm.reset_parameters()

    def init_weights(self) -> None:
        """Load ``init_cfg``'s pretrained checkpoint strictly, or keep the official init."""
        if not (self.init_cfg and self.init_cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        path = self.init_cfg['checkpoint']
        state_dict, _ = split_backbone_and_head(
            convert_vil_state_dict(read_state_dict(path, prefix=self.init_cfg.get('prefix')), source=path))
        for name in ('norm', 'out_norm'):
            if getattr(self, name) is None:  # the checkpoint's classifier norms, not used by this configuration
                state_dict.pop(f'{name}.weight', None)
                state_dict.pop(f'{name}.bias', None)
        if self.out_norm is not None and 'out_norm.weight' not in state_dict:
            # The official feature mode does the same: its loader resets this norm to weight 1, bias 0.
            state_dict.update({f'out_norm.{k}': v for k, v in self.out_norm.state_dict().items()})
            print_log('ViL: out_norm is not in the checkpoint; it keeps weight 1 and bias 0', logger='current')
        load_state_dict_strictly(self, state_dict, source=path)  # the load hook resamples the position embedding
        print_log(f'ViL: loaded {len(state_dict)} tensors from {path}', logger='current')
        self._is_init = True

    def _resample_loaded_pos_embed(self, state_dict: dict, prefix: str, *args) -> None:
        """Resample a ViL grid embedding ``(1, h, w, D)`` of another grid; any other shape (e.g. the ``(1, N, D)``
        sequence of a ViT/DeiT checkpoint) is left for the strict loading to report."""
        key = prefix + 'pos_embed'
        loaded = state_dict.get(key)
        if loaded is not None and loaded.dim() == 4 and loaded.shape[-1] == self.embed_dims and \
                loaded.shape != self.pos_embed.shape:
            old_grid = tuple(state_dict[key].shape[1:3])
            state_dict[key] = resample_grid_pos_embed(state_dict[key], self.pos_embed.shape[1:3])
            print_log(f'ViL: resampled position embedding {old_grid} -> {tuple(self.pos_embed.shape[1:3])}',
                      logger='current')

    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Patch tokens ``(B, N, D)`` with position embedding, and their grid. Pads H, W up to the patch size."""
        x = pad_to_patches(x, self.in_channels, self.patch_size, 'ViL', self.patch_stride)
        # Tokens contiguous (B, N, D): a permuted view of the conv output would keep its channel-major strides through
        # every residual add, so that each block's norm copied its input and its adds and gradients ran strided.
        x = self.patch_embed(x).permute(0, 2, 3, 1).contiguous()
        grid = tuple(x.shape[1:3])
        x = x + resample_grid_pos_embed(self.pos_embed, grid)
        return x.flatten(1, 2), grid

    def _run_block(self, block: Callable, *args) -> Union[Tensor, Tuple[Tensor, Update]]:
        if self.with_cp and self.training and args[0].requires_grad:
            return cp.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_intermediates(self, x: Tensor) -> Tuple[Dict[int, Tensor], Tuple[int, int]]:
        """Raw tokens after each block in ``out_indices`` (the last one through ``norm`` and ``out_norm`` if set).

        Where the norms run as kernels, each block's residual add is left to the next block's norm kernel
        (:meth:`ViLBlock.forward_update`); the blocks whose outputs are returned add it themselves. Blocks with forward
        hooks (which ``forward_update`` would not run) are called one by one instead."""
        x, grid = self.embed(x)
        outs = {}
        update = None  # the previous block's update, not yet added to x
        defer_adds = fuses_adds(x) and not any(_runs_hooks(block) for block in self.layers)
        for i, block in enumerate(self.layers[:self.out_indices[-1] + 1]):
            if defer_adds:
                x, update = self._run_block(block.forward_update, x, update, grid)
                if i in self.out_indices:
                    x, update = add_update(x, update), None
            else:
                x = self._run_block(block, x, grid)
            if i in self.out_indices:
                outs[i] = self._last_norms(x) if i == self.num_layers - 1 else x
        return outs, grid

    def _last_norms(self, x: Tensor) -> Tensor:
        for norm in (self.norm, self.out_norm):
            if norm is not None:
                x = norm(x)
        return x

    def format_output(self, tokens: Tensor, grid: Tuple[int, int]) -> Tensor:
        if self.out_type == 'raw':
            return tokens
        if self.out_type == 'pooled':
            return torch.cat([tokens[:, 0], tokens[:, -1]], dim=1)
        if self.out_type == 'avg_pooled':
            return (tokens[:, 0] + tokens[:, -1]) / 2
        if torch.is_grad_enabled() and tokens.requires_grad:
            tokens = _ContiguousGrad.apply(tokens)
        return tokens.transpose(1, 2).unflatten(-1, grid).contiguous()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        outs, grid = self.forward_intermediates(x)
        return tuple(self.format_output(outs[i], grid) for i in self.out_indices)

    def no_weight_decay(self) -> set:
        return {'pos_embed'}

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer id for layer-wise lr decay, the official ``group_two_blocks`` grouping.

        Each pair of blocks (one per direction) is one layer: embeddings 0, pair ``j`` is ``j + 1``, the rest
        (final norm, heads) ``num_layers - 1``, where ``num_layers = num_pairs + 2``.
        """
        num_layers = (self.num_layers + 1) // 2 + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name.startswith(('patch_embed', 'pos_embed')):
            return 0, num_layers
        if name.startswith('layers.'):
            return int(name.split('.')[1]) // 2 + 1, num_layers
        return num_layers - 1, num_layers
