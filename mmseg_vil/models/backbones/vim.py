"""Vision Mamba (Vim, hustvl/Vim) in plain PyTorch, as an MMSegmentation / MMPretrain backbone.

The architecture, numerics and checkpoint handling follow ``vim_spec.md``: the released "v2" models with a middle
class token, an fp32 residual stream with RMSNorm, and bidirectional Mamba mixers. Official checkpoints load
strictly through :func:`convert_official_vim`; the position embedding is stored as a channels-last grid so that it
can be resampled for any input size.
"""
import math
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from mmcv.cnn.bricks import DropPath
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmseg_vil.registry import register_model
from mmseg_vil.utils.checkpoint import StateDict, load_state_dict_strictly, read_state_dict
from ..layers.mamba import BidirectionalMamba
from ..layers.pos_embed import resample_grid_pos_embed
from ..layers.selective_scan import DEFAULT_CHUNK_SIZE
from .isotropic import pad_to_patches, resolve_out_indices

# Official mixer parameter name -> ours; the official "_b" parameters belong to the backward scan.
_OFFICIAL_MIXER_NAMES = {
    'conv1d': 'forward_branch.conv1d', 'x_proj': 'forward_branch.x_proj', 'dt_proj': 'forward_branch.dt_proj',
    'A_log': 'forward_branch.A_log', 'D': 'forward_branch.D',
    'conv1d_b': 'backward_branch.conv1d', 'x_proj_b': 'backward_branch.x_proj',
    'dt_proj_b': 'backward_branch.dt_proj', 'A_b_log': 'backward_branch.A_log', 'D_b': 'backward_branch.D',
}


def is_official_vim(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses the official key names (its mixers have an ``A_b_log``)."""
    return any(key.endswith('.mixer.A_b_log') for key in state_dict)


def convert_official_vim(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename an official Vim state dict to this package's keys; state dicts already in our format pass through.

    The classifier ``head`` is dropped, ``patch_embed.proj`` becomes ``patch_embed``, the mixers' direction
    suffixes become ``forward_branch`` / ``backward_branch`` modules, and the sequence ``pos_embed`` (patch entries
    with the class entry in the middle) is split into a square ``(1, h, w, D)`` grid and ``cls_pos_embed``.
    The input is not modified. Only the patch-stride models are supported: nothing in the weights of the stride-8
    "+" models tells them apart, and their 27x27 grid would be resampled as if it were one of 16-pixel patches.
    """
    if not is_official_vim(state_dict):
        return OrderedDict(state_dict)
    converted = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('head.'):
            continue
        if key == 'pos_embed':
            converted.update(_split_official_pos_embed(value, has_cls_token='cls_token' in state_dict))
        elif key.startswith('patch_embed.proj.'):
            converted['patch_embed.' + key[len('patch_embed.proj.'):]] = value
        else:
            converted[_rename_official_mixer_key(key)] = value
    return converted


def _rename_official_mixer_key(key: str) -> str:
    head, sep, tail = key.partition('.mixer.')
    name, dot, attribute = tail.partition('.')
    if not sep or name not in _OFFICIAL_MIXER_NAMES:
        return key
    return f'{head}.mixer.{_OFFICIAL_MIXER_NAMES[name]}{dot}{attribute}'


def _split_official_pos_embed(pos_embed: Tensor, has_cls_token: bool) -> Dict[str, Tensor]:
    """``(1, M [+1], D)`` with the class entry at ``M // 2`` -> grid ``(1, h, w, D)`` and ``(1, 1, D)`` class entry."""
    num_patches = pos_embed.shape[1] - int(has_cls_token)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f'official pos_embed has {num_patches} patch entries, which is not a square grid')
    if not has_cls_token:
        return {'pos_embed': pos_embed.reshape(1, side, side, -1)}
    middle = num_patches // 2
    grid = torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1:]], dim=1)
    return {'pos_embed': grid.reshape(1, side, side, -1), 'cls_pos_embed': pos_embed[:, middle:middle + 1]}


def _insert_middle(sequence: Tensor, item: Tensor) -> Tensor:
    """Insert ``item`` (B, 1, D) into ``sequence`` (B, M, D) at index ``M // 2``, where Vim keeps its class token."""
    middle = sequence.shape[1] // 2
    return torch.cat([sequence[:, :middle], item, sequence[:, middle:]], dim=1)


class RMSNorm(nn.Module):
    """Mamba's RMSNorm (no centring, no bias), computed in float32 whatever the input dtype.

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
        return (normed * self.weight.float()).to(x.dtype)


class VimBlock(nn.Module):
    """Vim layer: the residual stream is RMS-normalised and mixed, and the mixer output is added back.

    Args:
        embed_dims: token width.
        drop_path_rate: probability of dropping this layer's mixer output from the residual stream.
        norm_eps: epsilon of the RMSNorm.
        scan_chunk_size: tokens per chunk of the PyTorch selective scan.
    """

    def __init__(self, embed_dims: int, drop_path_rate: float = 0.0, norm_eps: float = 1e-5,
                 scan_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.norm = RMSNorm(embed_dims, eps=norm_eps)
        self.mixer = BidirectionalMamba(embed_dims, scan_chunk_size=scan_chunk_size)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """Return the mixer output and the updated residual stream, which stays float32."""
        hidden = self.mixer(self.norm(residual))
        return hidden, residual + self.drop_path(hidden).float()


@register_model
class Vim(BaseModule):
    """Vision Mamba backbone (the released ``bimambav2 ... midclstok_div2`` models).

    Patch embedding, a class token in the middle of the token sequence, a learned absolute position embedding and
    a stack of :class:`VimBlock`. Inputs whose sides are not multiples of the patch size are zero-padded at the
    right and bottom; the position embedding is resampled (bicubic) for grids other than the one of ``img_size``.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims`` and ``num_layers``.
        img_size: input size the position embedding is stored for; checkpoints are resampled to it at load time.
        patch_size: side of the square, non-overlapping patches.
        in_channels: channels of the input images.
        out_indices: layers whose outputs are returned (negative values count from the end), in increasing order.
        out_type: ``'featmap'`` gives ``(B, C, H/p, W/p)`` maps without the class token, ``'raw'`` the tokens
            ``(B, L, C)`` with the class token at ``L // 2``, ``'cls_token'`` its row ``(B, C)``.
        feature_source: ``'mixer'`` returns the layer's mixer output, the features of Vim's segmentation code;
            ``'residual'`` returns the residual stream after the layer, which the classifier reads.
        with_cls_token: keep the class token in the sequence as the released classifiers do. Without it the
            checkpoint's class token is dropped at load time, as in Vim's segmentation models.
        final_norm: apply the final RMSNorm to the last layer's output; needs ``feature_source='residual'``.
            Without it the checkpoint's ``norm_f`` is dropped at load time.
        drop_path_rate: drop-path probability of the last layer, rising linearly from 0 at the first.
        norm_eps: epsilon of the RMSNorms.
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
    OUT_TYPES = ('featmap', 'raw', 'cls_token')
    FEATURE_SOURCES = ('mixer', 'residual')

    def __init__(self,
                 arch: Union[str, Mapping[str, int]] = 'tiny',
                 img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: int = 16,
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (5, 11, 17, 23),
                 out_type: str = 'featmap',
                 feature_source: str = 'mixer',
                 with_cls_token: bool = True,
                 final_norm: bool = False,
                 drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-5,
                 with_cp: bool = False,
                 scan_chunk_size: int = DEFAULT_CHUNK_SIZE,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.embed_dims, self.num_layers = self._resolve_arch(arch)
        if out_type not in self.OUT_TYPES:
            raise ValueError(f'out_type must be one of {self.OUT_TYPES}, got {out_type!r}')
        if feature_source not in self.FEATURE_SOURCES:
            raise ValueError(f'feature_source must be one of {self.FEATURE_SOURCES}, got {feature_source!r}')
        if out_type == 'cls_token' and not with_cls_token:
            raise ValueError("out_type='cls_token' needs with_cls_token=True")
        if final_norm and feature_source != 'residual':
            raise ValueError("final_norm normalises the residual stream and needs feature_source='residual'")
        self.out_indices = resolve_out_indices(out_indices, self.num_layers, 'layers')
        self.out_type = out_type
        self.feature_source = feature_source
        self.with_cls_token = with_cls_token
        self.final_norm = final_norm
        self.with_cp = with_cp
        self.in_channels = in_channels
        self.patch_size = patch_size
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid_size = (math.ceil(img_h / patch_size), math.ceil(img_w / patch_size))

        self.patch_embed = nn.Conv2d(in_channels, self.embed_dims, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, self.embed_dims))
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
        drop_path_rates = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList(
            VimBlock(self.embed_dims, rate, norm_eps, scan_chunk_size) for rate in drop_path_rates)
        if final_norm:
            self.norm_f = RMSNorm(self.embed_dims, eps=norm_eps)
        self._init_parameters()

    def _resolve_arch(self, arch: Union[str, Mapping[str, int]]) -> Tuple[int, int]:
        if isinstance(arch, str):
            if arch not in self.arch_zoo:
                raise ValueError(f'unknown Vim arch {arch!r}; choose one of {sorted(self.arch_zoo)} or pass a dict')
            arch = self.arch_zoo[arch]
        missing = {'embed_dims', 'num_layers'} - set(arch)
        if missing:
            raise ValueError(f'a custom Vim arch needs the keys embed_dims and num_layers; missing {sorted(missing)}')
        return int(arch['embed_dims']), int(arch['num_layers'])

    @torch.no_grad()
    def _init_parameters(self) -> None:
        """Official init for training from scratch (vim_spec.md §3); pretrained weights replace it."""
        fan_in = self.in_channels * self.patch_size**2
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # LeCun normal truncated at two std
        nn.init.trunc_normal_(self.patch_embed.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        for embedding in [self.pos_embed] + ([self.cls_token, self.cls_pos_embed] if self.with_cls_token else []):
            nn.init.trunc_normal_(embedding, std=0.02)
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

        Converts official keys, resamples the position-embedding grid to ``grid_size`` and drops the class token and
        final norm when this model has none. The input is not modified.
        """
        state_dict = convert_official_vim(state_dict)
        pos_embed = state_dict.get('pos_embed')
        if pos_embed is not None and pos_embed.dim() == 4 and tuple(pos_embed.shape[1:3]) != self.grid_size:
            state_dict['pos_embed'] = resample_grid_pos_embed(pos_embed, self.grid_size)
            print_log(f'Vim: pos_embed resampled from a {tuple(pos_embed.shape[1:3])} grid to {self.grid_size}',
                      logger='current')
        unused = []
        if not self.with_cls_token:
            unused += ['cls_token', 'cls_pos_embed']
        if not self.final_norm:
            unused.append('norm_f.weight')
        dropped = [key for key in unused if state_dict.pop(key, None) is not None]
        if dropped:
            print_log(f'Vim: checkpoint entries not used by this configuration: {dropped}', logger='current')
        return state_dict

    def no_weight_decay(self) -> Set[str]:
        """Names of the token and position parameters, which are trained without weight decay."""
        return {'pos_embed', 'cls_token', 'cls_pos_embed'} if self.with_cls_token else {'pos_embed'}

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
        """Position embedding ``(1, L, D)`` in token order for a patch grid, the class entry in the middle."""
        pos_embed = resample_grid_pos_embed(self.pos_embed, grid).flatten(1, 2)
        return _insert_middle(pos_embed, self.cls_pos_embed) if self.with_cls_token else pos_embed

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Return one output per entry of ``out_indices`` for images ``x`` of shape ``(B, C, H, W)``."""
        patches = self.patch_embed(pad_to_patches(x, self.in_channels, self.patch_size, 'Vim'))
        grid = (patches.shape[-2], patches.shape[-1])
        tokens = patches.flatten(2).transpose(1, 2)
        if self.with_cls_token:
            tokens = _insert_middle(tokens, self.cls_token.expand(tokens.shape[0], -1, -1))
        residual = (tokens + self.sequence_pos_embed(grid)).float()
        outs = []
        for index, layer in enumerate(self.layers[:self.out_indices[-1] + 1]):
            if self.with_cp and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, residual, use_reentrant=False)
            else:
                hidden, residual = layer(residual)
            if index in self.out_indices:
                feature = hidden if self.feature_source == 'mixer' else residual
                if self.final_norm and index == self.num_layers - 1:
                    feature = self.norm_f(feature)
                outs.append(self._format_output(feature, grid))
        return tuple(outs)

    def _format_output(self, feature: Tensor, grid: Tuple[int, int]) -> Tensor:
        if self.out_type == 'raw':
            return feature
        middle = grid[0] * grid[1] // 2
        if self.out_type == 'cls_token':
            return feature[:, middle]
        if self.with_cls_token:
            feature = torch.cat([feature[:, :middle], feature[:, middle + 1:]], dim=1)
        return feature.transpose(1, 2).reshape(feature.shape[0], self.embed_dims, *grid)
