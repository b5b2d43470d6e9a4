"""Vision Mamba (Vim, hustvl/Vim) in plain PyTorch, as an MMSegmentation / MMPretrain backbone.

The architecture, numerics and checkpoint handling follow ``vim_spec.md``: by default the released "v2" models with a
middle class token, an fp32 residual stream with RMSNorm, and bidirectional Mamba mixers; the other options of the
official ``VisionMamba`` are arguments here (:mod:`.vim_options` translates the official constructor kwargs).
Official checkpoints load strictly through :func:`convert_official_vim`; the position embedding is stored as a
channels-last grid so that it can be resampled for any input size.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmseg_vil.registry import register_model
from mmseg_vil.utils.checkpoint import StateDict, load_state_dict_strictly, read_state_dict
from ..layers.mamba import BidirectionalMamba
from ..layers.pos_embed import resample_grid_pos_embed
from ..layers.rope import apply_rope, rope_tables
from ..layers.selective_scan import DEFAULT_CHUNK_SIZE
from .isotropic import pad_to_patches, patch_grid, resolve_out_indices

# Where the class tokens sit in the sequence of M patch tokens: official use_middle_cls_token (index M // 2, the
# released models), a leading token (index 0) or use_double_cls_token (one at each end).
CLS_POSITIONS = ('middle', 'head', 'double')
NORM_TYPES = ('rms', 'ln')
OUT_TYPES = ('featmap', 'raw', 'cls_token', 'mean_pooled', 'last_token')
FEATURE_SOURCES = ('mixer', 'residual')
# Official mixer parameter name -> ours; the official "_b" parameters belong to the backward scan.
_OFFICIAL_MIXER_NAMES = {
    'conv1d': 'forward_branch.conv1d', 'x_proj': 'forward_branch.x_proj', 'dt_proj': 'forward_branch.dt_proj',
    'A_log': 'forward_branch.A_log', 'D': 'forward_branch.D',
    'conv1d_b': 'backward_branch.conv1d', 'x_proj_b': 'backward_branch.x_proj',
    'dt_proj_b': 'backward_branch.dt_proj', 'A_b_log': 'backward_branch.A_log', 'D_b': 'backward_branch.D',
}


def is_official_vim(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses the official key names (its mixers have a bare ``A_log``)."""
    return any(key.endswith('.mixer.A_log') for key in state_dict)


def cls_indices(position: str, length: int) -> List[int]:
    """Indices of the class tokens in a sequence of ``length`` tokens (patches and class tokens)."""
    return {'middle': [(length - 1) // 2], 'head': [0], 'double': [0, length - 1]}[position]


def insert_cls(patches: Tensor, cls: Tensor, position: str) -> Tensor:
    """Insert the class tokens ``cls (B, T, D)`` into the patch sequence ``(B, M, D)`` where ``position`` says."""
    if position == 'middle':
        middle = patches.shape[1] // 2
        return torch.cat([patches[:, :middle], cls, patches[:, middle:]], dim=1)
    if position == 'head':
        return torch.cat([cls, patches], dim=1)
    return torch.cat([cls[:, :1], patches, cls[:, 1:]], dim=1)


def remove_cls(sequence: Tensor, position: str) -> Tensor:
    """The patch tokens of a sequence with class tokens at ``position``."""
    keep = [i for i in range(sequence.shape[1]) if i not in cls_indices(position, sequence.shape[1])]
    return sequence[:, keep]


def convert_official_vim(state_dict: Mapping[str, Tensor], cls_position: str = 'middle') -> StateDict:
    """Rename an official Vim state dict to this package's keys; state dicts already in our format pass through.

    The classifier ``head`` and the RoPE tables are dropped, ``patch_embed.proj`` becomes ``patch_embed``, the
    mixers' direction suffixes become ``forward_branch`` / ``backward_branch`` modules (``bimamba_type='v1'``:
    ``A_b_log`` becomes ``backward_A_log``), the class tokens ``cls_token`` (or ``cls_token_head`` and
    ``cls_token_tail``) one ``(1, T, D)`` tensor, and the sequence ``pos_embed`` (patch entries with the class
    entries at ``cls_position``, which the weights do not tell: ``'middle'`` for the released models) a square
    ``(1, h, w, D)`` grid and ``cls_pos_embed``. The grid side is the square root of the number of patch entries:
    models with overlapping patches (stride 8) load into a Vim built with the same ``patch_stride`` and
    ``img_size``. The input is not modified.
    """
    if not is_official_vim(state_dict):
        return OrderedDict(state_dict)
    double = 'cls_token_head' in state_dict
    if double:
        cls_position = 'double'
    v1 = any(key.endswith('.mixer.A_b_log') for key in state_dict) and not any('.conv1d_b.' in k for k in state_dict)
    converted = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(('head.', 'rope.', 'cls_token_tail')):
            continue
        if key == 'pos_embed':
            converted.update(_split_official_pos_embed(value, _num_cls_tokens(state_dict), cls_position))
        elif key == 'cls_token_head':
            converted['cls_token'] = torch.cat([value, state_dict['cls_token_tail']], dim=1)
        elif key.startswith('patch_embed.proj.'):
            converted['patch_embed.' + key[len('patch_embed.proj.'):]] = value
        elif v1 and key.endswith('.mixer.A_b_log'):
            converted[key.replace('.mixer.A_b_log', '.mixer.backward_A_log')] = value
        else:
            converted[_rename_official_mixer_key(key)] = value
    return converted


def _num_cls_tokens(state_dict: Mapping[str, Tensor]) -> int:
    return 2 if 'cls_token_head' in state_dict else int('cls_token' in state_dict)


def _rename_official_mixer_key(key: str) -> str:
    head, sep, tail = key.partition('.mixer.')
    name, dot, attribute = tail.partition('.')
    if not sep or name not in _OFFICIAL_MIXER_NAMES:
        return key
    return f'{head}.mixer.{_OFFICIAL_MIXER_NAMES[name]}{dot}{attribute}'


def _split_official_pos_embed(pos_embed: Tensor, num_cls: int, cls_position: str) -> Dict[str, Tensor]:
    """``(1, M + T, D)`` with the class entries at ``cls_position`` -> grid ``(1, h, w, D)`` and ``(1, T, D)``."""
    num_patches = pos_embed.shape[1] - num_cls
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f'official pos_embed has {num_patches} patch entries, which is not a square grid')
    if not num_cls:
        return {'pos_embed': pos_embed.reshape(1, side, side, -1)}
    indices = cls_indices(cls_position, pos_embed.shape[1])
    grid = remove_cls(pos_embed, cls_position)
    return {'pos_embed': grid.reshape(1, side, side, -1), 'cls_pos_embed': pos_embed[:, indices]}


class RMSNorm(nn.Module):
    """Mamba's RMSNorm (no centring, no bias), computed in float32 and returned in the dtype of its weight.

    The residual stream may be float32 in a half-precision model (``residual_in_fp32``); the normalised tokens
    enter the mixer in the model's dtype, as out of Mamba's fused add + norm.

    Args:
        dims: size of the normalised last dimension.
        eps: added to the mean square.
    """

    def __init__(self, dims: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(self.weight.dtype)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm (``rms_norm=False``) computed in float32 and returned in the dtype of its weight, as RMSNorm."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(self.weight.dtype)


def build_norm(norm_type: str, dims: int, eps: float) -> nn.Module:
    if norm_type not in NORM_TYPES:
        raise ValueError(f'norm_type={norm_type!r} is not supported; choose one of {NORM_TYPES}')
    return RMSNorm(dims, eps) if norm_type == 'rms' else Float32LayerNorm(dims, eps)


class VimBlock(nn.Module):
    """Vim layer: normalises the residual stream and mixes it; the stream itself is carried by :class:`Vim`.

    Args:
        embed_dims: token width.
        drop_path_rate: probability of dropping this layer's mixer output from the residual stream.
        norm_type: ``'rms'`` (RMSNorm) or ``'ln'`` (LayerNorm with bias).
        norm_eps: epsilon of the norm.
        **mixer_kwargs: :class:`~..layers.mamba.BidirectionalMamba` options.
    """

    def __init__(self, embed_dims: int, drop_path_rate: float = 0.0, norm_type: str = 'rms', norm_eps: float = 1e-5,
                 **mixer_kwargs) -> None:
        super().__init__()
        self.norm = build_norm(norm_type, embed_dims, norm_eps)
        self.mixer = BidirectionalMamba(embed_dims, **mixer_kwargs)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, residual: Tensor) -> Tensor:
        """The mixer output for the residual stream entering this layer."""
        return self.mixer(self.norm(residual))


@register_model
class Vim(BaseModule):
    """Vision Mamba backbone (by default the released ``bimambav2 ... midclstok_div2`` models).

    Patch embedding, class tokens (by default one in the middle of the token sequence), a learned absolute position
    embedding and a stack of :class:`VimBlock`. Inputs whose sides do not fit whole patches are zero-padded at the
    right and bottom; the position embedding is resampled (bicubic) for grids other than the one of ``img_size``.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims`` and ``num_layers`` and optionally
            the mixer's ``d_state`` (16), ``d_conv`` (4), ``expand`` (2) and ``dt_rank`` (None: ``ceil(D / 16)``).
        img_size: input size the position embedding is stored for; checkpoints are resampled to it at load time.
        patch_size: side of the square patches.
        patch_stride: their stride, ``patch_size`` if None; a smaller one (8 in the "+" models) gives overlapping
            patches and a grid of ``(H - p) // s + 1``.
        in_channels: channels of the input images.
        out_indices: layers whose outputs are returned (negative values count from the end), in increasing order.
        out_type: ``'featmap'`` gives ``(B, C, H', W')`` maps without class tokens, ``'raw'`` the tokens
            ``(B, L, C)`` with the class tokens in place, ``'cls_token'`` the class token's row ``(B, C)`` (the mean
            of both rows for ``cls_position='double'``), ``'mean_pooled'`` / ``'last_token'`` the mean / the last
            of the tokens of a model without class tokens (official ``final_pool_type`` ``'mean'`` / ``'none'``).
        feature_source: ``'mixer'`` returns the layer's mixer output, the features of Vim's segmentation code;
            ``'residual'`` returns the residual stream after the layer, which the classifier reads.
        with_cls_token: keep class tokens in the sequence as the released classifiers do. Without them the
            checkpoint's class token is dropped at load time, as in Vim's segmentation models.
        cls_position: ``'middle'`` (released models), ``'head'`` or ``'double'`` (one token at each end).
        with_pos_embed: the learned absolute position embedding (official ``if_abs_pos_embed``).
        rope: rotate the tokens entering every layer with a 2-D rotary embedding (official ``if_rope``);
            ``rope_residual`` also rotates the residual stream there; ``rope_pt_grid`` is the official
            ``pt_hw_seq_len``. See :mod:`~..layers.rope`.
        norm_type: ``'rms'`` (RMSNorm, released models) or ``'ln'`` (LayerNorm with bias; official
            ``rms_norm=False``), for every layer and the final norm.
        residual_in_fp32: keep the residual stream in float32 (else in the dtype of the tokens).
        bimamba_type: ``'v2'`` (released models), ``'v1'`` or ``'none'``; see
            :class:`~..layers.mamba.BidirectionalMamba`, with ``divide_out`` and ``layer_scale``.
        final_norm: apply the final norm to the last layer's output; needs ``feature_source='residual'``.
            Without it the checkpoint's ``norm_f`` is dropped at load time.
        drop_rate: dropout after the position embedding.
        drop_path_rate: drop-path probability of the last layer, rising linearly from 0 at the first.
        norm_eps: epsilon of the norms.
        with_cp: recompute each layer in the backward pass (gradient checkpointing) to save memory.
        scan_chunk_size: tokens per chunk of the PyTorch selective scan; smaller chunks use less memory.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])`` loads an official or converted
            checkpoint strictly; any other init config is handled by :class:`~mmengine.model.BaseModule`.
    """

    arch_zoo = {
        'tiny': {'embed_dims': 192, 'num_layers': 24},
        'small': {'embed_dims': 384, 'num_layers': 24},
        'base': {'embed_dims': 768, 'num_layers': 24},
    }
    mixer_defaults = dict(d_state=16, d_conv=4, expand=2, dt_rank=None)

    def __init__(self,
                 arch: Union[str, Mapping[str, int]] = 'tiny',
                 img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: int = 16,
                 patch_stride: Optional[int] = None,
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (5, 11, 17, 23),
                 out_type: str = 'featmap',
                 feature_source: str = 'mixer',
                 with_cls_token: bool = True,
                 cls_position: str = 'middle',
                 with_pos_embed: bool = True,
                 rope: bool = False,
                 rope_residual: bool = False,
                 rope_pt_grid: int = 14,
                 norm_type: str = 'rms',
                 residual_in_fp32: bool = True,
                 bimamba_type: str = 'v2',
                 divide_out: bool = True,
                 layer_scale: Optional[float] = None,
                 final_norm: bool = False,
                 drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-5,
                 with_cp: bool = False,
                 scan_chunk_size: int = DEFAULT_CHUNK_SIZE,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        arch = self._resolve_arch(arch)
        self.embed_dims, self.num_layers = int(arch['embed_dims']), int(arch['num_layers'])
        self._check_options(out_type, feature_source, with_cls_token, cls_position, rope, final_norm)
        self.out_indices = resolve_out_indices(out_indices, self.num_layers, 'layers')
        self.out_type = out_type
        self.feature_source = feature_source
        self.with_cls_token = with_cls_token
        self.cls_position = cls_position
        self.with_pos_embed = with_pos_embed
        self.rope, self.rope_residual, self.rope_pt_grid = rope, rope_residual, rope_pt_grid
        self.residual_in_fp32 = residual_in_fp32
        self.final_norm = final_norm
        self.with_cp = with_cp
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.patch_stride = patch_size if patch_stride is None else patch_stride
        if not 0 < self.patch_stride <= patch_size:
            raise ValueError(f'patch_stride={patch_stride} must lie in [1, patch_size={patch_size}]')
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid_size = patch_grid((img_h, img_w), patch_size, self.patch_stride)

        self.patch_embed = nn.Conv2d(in_channels, self.embed_dims, patch_size, stride=self.patch_stride)
        num_cls = 2 if cls_position == 'double' else 1
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, num_cls, self.embed_dims))
        if with_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, self.embed_dims))
            if with_cls_token:
                self.cls_pos_embed = nn.Parameter(torch.zeros(1, num_cls, self.embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = torch.linspace(0, drop_path_rate, self.num_layers, device='cpu').tolist()
        mixer_kwargs = {key: arch.get(key, default) for key, default in self.mixer_defaults.items()}
        self.layers = nn.ModuleList(
            VimBlock(self.embed_dims, rate, norm_type, norm_eps, bimamba_type=bimamba_type, divide_out=divide_out,
                     layer_scale=layer_scale, scan_chunk_size=scan_chunk_size, **mixer_kwargs)
            for rate in drop_path_rates)
        if final_norm:
            self.norm_f = build_norm(norm_type, self.embed_dims, norm_eps)
        self._init_parameters()

    def _check_options(self, out_type: str, feature_source: str, with_cls_token: bool, cls_position: str,
                       rope: bool, final_norm: bool) -> None:
        if out_type not in OUT_TYPES:
            raise ValueError(f'out_type must be one of {OUT_TYPES}, got {out_type!r}')
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f'feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}')
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f'cls_position={cls_position!r} is not supported; choose one of {CLS_POSITIONS}')
        if out_type == 'cls_token' and not with_cls_token:
            raise ValueError("out_type='cls_token' needs with_cls_token=True")
        if out_type in ('mean_pooled', 'last_token') and with_cls_token:
            raise ValueError(f"out_type={out_type!r} pools a sequence without class tokens: set "
                             "with_cls_token=False, or read the class token with out_type='cls_token'")
        if final_norm and feature_source != 'residual':
            raise ValueError("final_norm normalises the residual stream and needs feature_source='residual'")
        if rope and with_cls_token and cls_position == 'double':
            raise ValueError("rope=True with cls_position='double' is not supported: the official rotary "
                             'embedding fails on a sequence with two class tokens')
        if rope and self.embed_dims % 4:
            raise ValueError(f'rope=True needs embed_dims divisible by 4, got {self.embed_dims}')

    def _resolve_arch(self, arch: Union[str, Mapping[str, int]]) -> Mapping[str, int]:
        if isinstance(arch, str):
            if arch not in self.arch_zoo:
                raise ValueError(f'unknown Vim arch {arch!r}; choose one of {sorted(self.arch_zoo)} or pass a dict')
            arch = self.arch_zoo[arch]
        missing = {'embed_dims', 'num_layers'} - set(arch)
        if missing:
            raise ValueError(f'a custom Vim arch needs the keys embed_dims and num_layers; missing {sorted(missing)}')
        unknown = set(arch) - {'embed_dims', 'num_layers'} - set(self.mixer_defaults)
        if unknown:
            raise ValueError(f'Vim arch {dict(arch)} has unknown keys {sorted(unknown)}; known: embed_dims, '
                             f'num_layers, {", ".join(self.mixer_defaults)}')
        return arch

    @torch.no_grad()
    def _init_parameters(self) -> None:
        """Official init for training from scratch (vim_spec.md §3); pretrained weights replace it."""
        fan_in = self.in_channels * self.patch_size**2
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # LeCun normal truncated at two std
        nn.init.trunc_normal_(self.patch_embed.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        for name in ('pos_embed', 'cls_token', 'cls_pos_embed'):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
        for layer in self.layers:  # GPT-2 style: one residual branch per layer
            layer.mixer.out_proj.weight.div_(math.sqrt(self.num_layers))

    def init_weights(self) -> None:
        """Load a ``Pretrained`` init_cfg strictly (official or converted keys); defer anything else to MMEngine."""
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        source = self.init_cfg['checkpoint']
        state_dict = read_state_dict(source, prefix=self.init_cfg.get('prefix'))
        load_state_dict_strictly(self, self.adapt_state_dict(state_dict), source)

    def adapt_state_dict(self, state_dict: Mapping[str, Tensor]) -> StateDict:
        """Fit an official or converted checkpoint to this configuration.

        Converts official keys (class entries at ``cls_position``), resamples the position-embedding grid to
        ``grid_size`` and drops the class token and final norm when this model has none. The input is not modified.
        """
        state_dict = convert_official_vim(state_dict, self.cls_position)
        pos_embed = state_dict.get('pos_embed')
        if pos_embed is not None and pos_embed.dim() == 4 and tuple(pos_embed.shape[1:3]) != self.grid_size:
            state_dict['pos_embed'] = resample_grid_pos_embed(pos_embed, self.grid_size)
            print_log(f'Vim: pos_embed resampled from a {tuple(pos_embed.shape[1:3])} grid to {self.grid_size}',
                      logger='current')
        unused = []
        if not self.with_cls_token:
            unused += ['cls_token', 'cls_pos_embed']
        if not self.final_norm:
            unused += ['norm_f.weight', 'norm_f.bias']
        dropped = [key for key in unused if state_dict.pop(key, None) is not None]
        if dropped:
            print_log(f'Vim: checkpoint entries not used by this configuration: {dropped}', logger='current')
        return state_dict

    def no_weight_decay(self) -> Set[str]:
        """Names of the token and position parameters, which are trained without weight decay."""
        return {name for name in ('pos_embed', 'cls_token', 'cls_pos_embed') if hasattr(self, name)}

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter for layer-wise learning-rate decay (MMPretrain convention).

        Returns ``(depth, num_layers + 2)``: the stem (patch and position embeddings, class token) is 0, layer ``i``
        is ``i + 1`` and everything else, such as a decode head, is the last depth.
        """
        num_depths = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num_depths - 1, num_depths
        name = param_name[len(prefix):]
        if name.startswith('patch_embed') or name in ('pos_embed', 'cls_token', 'cls_pos_embed'):
            return 0, num_depths
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, num_depths
        return num_depths - 1, num_depths

    def sequence_pos_embed(self, grid: Tuple[int, int]) -> Tensor:
        """Position embedding ``(1, L, D)`` in token order for a patch grid, class entries in place."""
        pos_embed = resample_grid_pos_embed(self.pos_embed, grid).flatten(1, 2)
        return insert_cls(pos_embed, self.cls_pos_embed, self.cls_position) if self.with_cls_token else pos_embed

    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Tokens ``(B, L, D)`` (patches, class tokens, position embedding) and the patch grid of ``x``."""
        patches = self.patch_embed(pad_to_patches(x, self.in_channels, self.patch_size, 'Vim', self.patch_stride))
        grid = (patches.shape[-2], patches.shape[-1])
        tokens = patches.flatten(2).transpose(1, 2)
        if self.with_cls_token:
            tokens = insert_cls(tokens, self.cls_token.expand(tokens.shape[0], -1, -1), self.cls_position)
        if self.with_pos_embed:
            tokens = self.pos_drop(tokens + self.sequence_pos_embed(grid))
        return tokens, grid

    def _rotate(self, hidden: Tensor, residual: Optional[Tensor], grid: Tuple[int, int]):
        cos, sin = (table.to(hidden.device) for table in rope_tables(grid, self.embed_dims, self.rope_pt_grid))
        if residual is not None and self.rope_residual:
            residual = apply_rope(residual, cos, sin)
        return apply_rope(hidden, cos, sin), residual

    def _add(self, residual: Tensor, hidden: Tensor, layer: VimBlock) -> Tensor:
        residual = residual + layer.drop_path(hidden)
        return residual.float() if self.residual_in_fp32 else residual

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Return one output per entry of ``out_indices`` for images ``x`` of shape ``(B, C, H, W)``.

        The official layer loop: the stream ``residual`` receives each layer's mixer output ``hidden`` when the next
        layer starts, after the rotary embedding if ``rope``; the final residual stream adds the last one.
        """
        hidden, grid = self.embed(x)
        residual, previous, outs = None, None, []
        for index, layer in enumerate(self.layers[:self.out_indices[-1] + 1]):
            if self.rope:
                hidden, residual = self._rotate(hidden, residual, grid)
            if residual is None:
                residual = hidden.float() if self.residual_in_fp32 else hidden
            else:
                residual = self._add(residual, hidden, previous)
            if self.with_cp and torch.is_grad_enabled():
                hidden = checkpoint(layer, residual, use_reentrant=False)
            else:
                hidden = layer(residual)
            previous = layer
            if index in self.out_indices:
                feature = hidden if self.feature_source == 'mixer' else self._add(residual, hidden, layer)
                if self.final_norm and index == self.num_layers - 1:
                    feature = self.norm_f(feature)
                outs.append(self._format_output(feature, grid))
        return tuple(outs)

    def _format_output(self, feature: Tensor, grid: Tuple[int, int]) -> Tensor:
        if self.out_type == 'raw':
            return feature
        if self.out_type == 'cls_token':
            return feature[:, cls_indices(self.cls_position, feature.shape[1])].mean(dim=1)
        if self.out_type == 'mean_pooled':
            return feature.mean(dim=1)
        if self.out_type == 'last_token':
            return feature[:, -1]
        if self.with_cls_token:
            feature = remove_cls(feature, self.cls_position)
        return feature.transpose(1, 2).reshape(feature.shape[0], self.embed_dims, *grid)
