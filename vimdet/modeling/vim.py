"""The Vision Mamba (Vim) trunk: Zhu et al., "Vision Mamba", arXiv 2401.09417 (ICML 2024).

Parameter names equal those of the released classification checkpoints (``patch_embed.proj.*``,
``pos_embed``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``), so their trunk tensors load
one to one. There is no class token: a detector reads a dense token grid. Parameters that take
no weight decay (``pos_embed``, ``A_log``, ``D``, the RMSNorm weights) carry the flag
``_no_weight_decay``, as in mamba-ssm; :mod:`vimdet.solver` reads it.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vimdet.ops import bidirectional_selective_scan, conv_both_directions

__all__ = ["VIM_SIZES", "RMSNorm", "BiMambaMixer", "VimBlock", "VisionMamba", "resize_pos_embed"]

# Published Vim sizes (Table 1 of the paper): embedding width and depth.
VIM_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 24},
    "small": {"embed_dim": 384, "depth": 24},
    "base": {"embed_dim": 768, "depth": 24},
}


def _no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Flag ``param`` for the optimizer's no-weight-decay group (mamba-ssm's convention)."""
    param._no_weight_decay = True
    return param


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32. x: (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = _no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32 * self.weight.float()


class _DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): zero whole samples with prob ``rate``."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _init_dt_proj(dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
    """Mamba's init: weight ~ U(+-rank^-0.5); bias = softplus^-1(dt), dt log-uniform in range."""
    bound = dt_proj.in_features**-0.5
    nn.init.uniform_(dt_proj.weight, -bound, bound)
    dt = torch.exp(
        torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def _scan_direction(
    inner: int,
    rank: int,
    d_state: int,
    d_conv: int,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
) -> Tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
    """One direction's (conv1d, x_proj, dt_proj, A_log, D), initialised as in Mamba and Vim."""
    conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, bias=True)
    x_proj = nn.Linear(inner, rank + 2 * d_state, bias=False)
    nn.init.trunc_normal_(x_proj.weight, std=0.02)
    dt_proj = nn.Linear(rank, inner, bias=True)
    _init_dt_proj(dt_proj, dt_min, dt_max, dt_init_floor)
    a_init = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)
    a_log = _no_weight_decay(nn.Parameter(torch.log(a_init)))
    skip = _no_weight_decay(nn.Parameter(torch.ones(inner)))
    return conv1d, x_proj, dt_proj, a_log, skip


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer ("bimamba v2" with divide-out).

    x, z = in_proj(h); each direction runs a causal depthwise conv, SiLU, x_proj -> (dt, B, C),
    dt_proj and the selective scan gated by SiLU(z); the backward direction has its own weights
    (``*_b``) and walks the sequence from its end (computed in place: its conv is anti-causal and
    :func:`vimdet.ops.bidirectional_selective_scan` walks down). Output:
    out_proj((y_fwd + y_bwd) / 2).
    Input and output: (B, L, dim). Parameter names are those of the released checkpoints.

    Args:
        dim: width of the token stream.
        d_state: SSM state size N per channel.
        d_conv: kernel size of the causal depthwise conv1d.
        expand: inner width as a multiple of ``dim``.
        dt_rank: rank of the delta projection; None means ceil(dim / 16) as in Mamba.
        dt_min, dt_max: range of the initial step size delta (log-uniform).
        dt_init_floor: smallest initial delta.
        scan_backend: selective-scan backend, one of :data:`vimdet.ops.BACKENDS`.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.scan_backend = scan_backend
        direction = dict(
            inner=self.d_inner,
            rank=self.dt_rank,
            d_state=d_state,
            d_conv=d_conv,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init_floor=dt_init_floor,
        )

        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        for linear in (self.in_proj, self.out_proj):  # Vim's init of the projections
            nn.init.trunc_normal_(linear.weight, std=0.02)
        # The forward direction, then the backward one (``*_b``), under the released names.
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _scan_direction(**direction)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _scan_direction(
            **direction
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, dim) -> (B, L, dim)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # token-major (B, L, E) views
        # Both directions' convs + SiLU, token-major: (2, B, L, E). Each direction's projections
        # run as one batched matmul over the stacked weights; B and C are views of its output.
        u = conv_both_directions(
            x,
            self.conv1d.weight,
            self.conv1d.bias,
            self.conv1d_b.weight,
            self.conv1d_b.bias,
            backend=self.scan_backend,
        )
        x_proj = torch.stack([self.x_proj.weight, self.x_proj_b.weight]).transpose(1, 2)
        dt, b, c = torch.matmul(u, x_proj[:, None]).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt_proj = torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]).transpose(1, 2)
        delta = torch.matmul(dt, dt_proj[:, None])  # its bias goes in as delta_bias
        y = bidirectional_selective_scan(
            u,
            delta,
            -torch.exp(torch.stack([self.A_log, self.A_b_log]).float()),
            b,
            c,
            D=torch.stack([self.D, self.D_b]).float(),
            z=z,
            delta_bias=torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y)


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer, with the residual stream kept in fp32.

    ``forward(h_prev, residual_prev) -> (h, residual)`` where residual = residual_prev +
    drop_path(h_prev) (or h_prev itself for the first block) and h = mixer(norm(residual)).

    Args:
        dim: width of the token stream.
        drop_path: stochastic-depth rate of this block's residual branch.
        mixer_kwargs: the rest of :class:`BiMambaMixer`'s arguments.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = _DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None) -> Tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden.float()
        else:
            residual = residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual)), residual


def _tracing() -> bool:
    """Whether torch.export, torch.compile or torch.jit.trace is tracing: tensors made now are
    fake (export, compile) or recorded (jit), and must not be cached for later calls."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _bicubic_matrix(src: int, dst: int, device: torch.device) -> Tensor:
    """(dst, src) weights of PyTorch's 1-D bicubic resize (align_corners=False), as a matrix;
    cached, except while the model is traced."""
    if _tracing():
        return _bicubic_weights(src, dst, device)
    return _cached_bicubic_weights(src, dst, device)


def _bicubic_weights(src: int, dst: int, device: torch.device) -> Tensor:
    basis = torch.eye(src, device=device)[None, :, :, None]  # src signals of length src
    weights = F.interpolate(basis, size=(dst, 1), mode="bicubic", align_corners=False)
    return weights[0, :, :, 0].t().contiguous()


_cached_bicubic_weights = functools.lru_cache(maxsize=64)(_bicubic_weights)


def resize_pos_embed(
    pos_embed: Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]
) -> Tensor:
    """Bicubically resize a (1, Hs*Ws, C) position grid to (1, Hd*Wd, C); exact if sizes match.

    Bicubic resizing is separable and linear: rows (Hd, Hs) @ grid @ cols (Ws, Wd), two small
    matmuls in fp32 instead of an upsampling kernel, which is cheap enough to run (and
    differentiate) at every training step. Equal to ``F.interpolate(mode="bicubic")``.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    rows = _bicubic_matrix(src_grid[0], dst_grid[0], pos_embed.device)
    cols = _bicubic_matrix(src_grid[1], dst_grid[1], pos_embed.device)
    grid = pos_embed.reshape(src_grid[0], src_grid[1], -1).float()
    with torch.autocast(pos_embed.device.type, enabled=False):
        resized = torch.einsum("ih,hwc,jw->ijc", rows, grid, cols)
    return resized.reshape(1, dst_grid[0] * dst_grid[1], -1).to(pos_embed.dtype)


class _PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, 3, H, W) -> (B, H/p * W/p, dim) and the grid (H/p, W/p)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionMamba: input {height}x{width} is not a multiple of the patch "
                f"size {self.patch_size}; pad it (the detector pads to the backbone's "
                "size_divisibility)"
            )
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class VisionMamba(nn.Module):
    """The Vim trunk for dense prediction: patch embed + position grid + Vim blocks.

    ``forward(images (B, 3, H, W))`` returns ``{"block{k}": (B, dim, H/16, W/16)}`` for each
    requested 1-based block k, where the feature after block k is ``residual_k + h_k`` (fp32,
    before any norm).

    Args:
        embed_dim: width of the token stream (192, 384, 768 for Vim-T/S/B).
        depth: number of Vim blocks.
        patch_size: side of the square patches, in pixels (the trunk's stride).
        in_chans: input image channels.
        pretrain_img_size: image side the position grid was trained at (224: a 14x14 grid); the
            grid is resized bicubically to each input's own token grid.
        d_state, d_conv, expand, dt_rank: the mixer's, see :class:`BiMambaMixer`.
        drop_path_rate: highest stochastic-depth rate; block i > 0 gets
            linspace(0, rate, depth)[i - 1].
        out_blocks: 1-based blocks whose output stream is returned; the last must be ``depth``.
        scan_backend: selective-scan backend, one of :data:`vimdet.ops.BACKENDS`.
        use_checkpoint: recompute each block in the backward pass (activation checkpointing).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 24,
        patch_size: int = 16,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        drop_path_rate: float = 0.0,
        out_blocks: Sequence[int] = (6, 12, 18, 24),
        scan_backend: str = "auto",
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_blocks = tuple(int(k) for k in out_blocks)
        if not out_blocks or min(out_blocks) < 1 or max(out_blocks) > depth:
            raise ValueError(
                f"VisionMamba: out_blocks {out_blocks} must be 1-based block numbers "
                f"in [1, depth={depth}]"
            )
        if max(out_blocks) != depth:
            # Blocks after the last tap would get no gradient (and break DDP).
            raise ValueError(
                f"VisionMamba: the last tapped block is {max(out_blocks)} but depth is {depth}; "
                f"tap block {depth} or set the depth (MODEL.VIM.DEPTH) to {max(out_blocks)}"
            )
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.out_blocks = out_blocks
        self.use_checkpoint = use_checkpoint
        self.pretrain_grid = (pretrain_img_size // patch_size,) * 2

        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        grid_size = self.pretrain_grid[0] * self.pretrain_grid[1]
        self.pos_embed = _no_weight_decay(nn.Parameter(torch.zeros(1, grid_size, embed_dim)))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Vim's schedule: block 0 gets 0, block i gets linspace(0, rate, depth)[i - 1].
        rates = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(
            VimBlock(
                embed_dim,
                drop_path=rates[i],
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                dt_rank=dt_rank,
                scan_backend=scan_backend,
            )
            for i in range(depth)
        )
        self._pos_cache: Dict[Tuple, Tensor] = {}

    def position_embedding(self, grid: Tuple[int, int]) -> Tensor:
        """The position grid resized to ``grid``; cached per size while no gradient is needed
        and the model is not traced."""
        if grid == self.pretrain_grid:
            return self.pos_embed
        if (torch.is_grad_enabled() and self.pos_embed.requires_grad) or _tracing():
            return resize_pos_embed(self.pos_embed, self.pretrain_grid, grid)
        key = (grid, self.pos_embed._version, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[1] == key[1]}
            self._pos_cache[key] = resize_pos_embed(
                self.pos_embed.detach(), self.pretrain_grid, grid
            )
        return self._pos_cache[key]

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        tokens, grid = self.patch_embed(images)
        hidden = tokens + self.position_embedding(grid)
        residual: Tensor | None = None
        outputs = {}
        for index, layer in enumerate(self.layers, start=1):
            if self.use_checkpoint and self.training:
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if index in self.out_blocks:
                feature = residual + hidden.float()
                outputs[f"block{index}"] = feature.transpose(1, 2).reshape(
                    feature.shape[0], self.embed_dim, grid[0], grid[1]
                )
        return outputs
