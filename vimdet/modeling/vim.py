"""The Vision Mamba (Vim) trunk: Zhu et al., "Vision Mamba", arXiv 2401.09417 (ICML 2024).

Parameter names equal those of the released classification checkpoints (``patch_embed.proj.*``,
``pos_embed``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``), so their trunk tensors load
one to one. There is no class token: a detector reads a dense token grid. Parameters that take
no weight decay (``pos_embed``, ``A_log``, ``D``, the RMSNorm weights) carry the flag
``_no_weight_decay``, as in mamba-ssm; :mod:`vimdet.solver` reads it.

Two trunk options from Vim's successors (docs/trunk_options.md), off by default: scan routes over
the 2-D token grid (``scan_routes``: Vim's rows, rows and columns in alternate blocks, or VMamba's
four-route cross-scan, Liu et al., arXiv 2401.10166) and self-attention instead of the Mamba mixer
in chosen blocks (``attention_blocks``, as MambaVision's late blocks, Hatamizadeh & Kautz, arXiv
2407.08083).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vimdet.ops import (
    add_rms_norm,
    add_rms_norm_reference,
    bidirectional_selective_scan_recomputing,
    column_major_walk,
    conv_both_directions,
    project_in_parts,
    project_sharing_input,
)

__all__ = [
    "BLOCK_ROUTES",
    "SCAN_ROUTES",
    "VIM_SIZES",
    "AttentionMixer",
    "BiMambaMixer",
    "RMSNorm",
    "VimBlock",
    "VisionMamba",
    "block_routes",
    "resize_pos_embed",
]

# Published Vim sizes (Table 1 of the paper): embedding width and depth.
VIM_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 24},
    "small": {"embed_dim": 384, "depth": 24},
    "base": {"embed_dim": 768, "depth": 24},
}

#: The trunk's scan routes (``MODEL.VIM.SCAN_ROUTES``): "row" (Vim's row-major walk, both ways in
#: every block), "row_column" (row-major in blocks 1, 3, ..., column-major in blocks 2, 4, ...),
#: "cross" (all four routes in every block, averaged: VMamba's cross-scan).
SCAN_ROUTES = ("row", "row_column", "cross")
#: What one mixer walks: "row", "column" (both with Vim's parameters) or "cross" (row routes with
#: Vim's parameters, column routes with their own ``*_c``/``*_cb`` ones).
BLOCK_ROUTES = ("row", "column", "cross")
#: Suffixes of each pair of directions' parameters: (forward, backward) along the rows, the
#: released names, and along the columns (``cross`` only).
_ROW_DIRECTIONS, _COLUMN_DIRECTIONS = ("", "_b"), ("_c", "_cb")


def block_routes(scan_routes: str, depth: int) -> List[str]:
    """The route of each of ``depth`` blocks (0-based) for a trunk's ``scan_routes``."""
    if scan_routes not in SCAN_ROUTES:
        raise ValueError(
            f"VisionMamba: scan_routes {scan_routes!r} (MODEL.VIM.SCAN_ROUTES) is unknown; use "
            f"one of {SCAN_ROUTES}"
        )
    if scan_routes == "row_column":
        return ["row" if i % 2 == 0 else "column" for i in range(depth)]
    return [scan_routes] * depth


def _no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Flag ``param`` for the optimizer's no-weight-decay group (mamba-ssm's convention)."""
    param._no_weight_decay = True
    return param


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32. x: (..., dim).

    :class:`VimBlock` applies it fused with the residual add (:func:`vimdet.ops.add_rms_norm`);
    alone it is that op without a residual.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = _no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        return add_rms_norm_reference(x, None, self.weight, self.eps)[0]


class _DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): zero whole samples with prob ``rate``."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def sample_scale(self, x: Tensor) -> Tensor | None:
        """(batch,) fp32 factors, 0 or 1 / keep, for x (batch, ...); None when nothing drops."""
        if self.rate == 0.0 or not self.training:
            return None
        keep = 1.0 - self.rate
        return torch.empty(x.shape[0], dtype=torch.float32, device=x.device).bernoulli_(keep) / keep

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
    """Vim's bidirectional Mamba mixer ("bimamba v2" with divide-out), along rows or columns.

    x, z = in_proj(h); each direction runs a causal depthwise conv, SiLU, x_proj -> (dt, B, C),
    dt_proj and the selective scan gated by SiLU(z); the backward direction has its own weights
    (``*_b``) and walks the sequence from its end (computed in place: its conv is anti-causal and
    :func:`vimdet.ops.bidirectional_selective_scan` walks down). Output:
    out_proj((y_fwd + y_bwd) / 2).
    Input and output: (B, L, dim). Parameter names are those of the released checkpoints.

    The route says which walk over the (H, W) token grid the two directions take: "row" (Vim's),
    "column" (down the columns, read in place, same parameters) or "cross" (VMamba's four routes,
    Liu et al., arXiv 2401.10166: the rows both ways with the released parameters, the columns
    both ways with their own, ``conv1d_c``, ``x_proj_c``, ``dt_proj_c``, ``A_c_log``, ``D_c`` and
    the ``_cb`` ones for up the columns; output out_proj of the mean of the four).

    Args:
        dim: width of the token stream.
        d_state: SSM state size N per channel.
        d_conv: kernel size of the causal depthwise conv1d.
        expand: inner width as a multiple of ``dim``.
        dt_rank: rank of the delta projection; None means ceil(dim / 16) as in Mamba.
        dt_min, dt_max: range of the initial step size delta (log-uniform).
        dt_init_floor: smallest initial delta.
        scan_backend: selective-scan backend, one of :data:`vimdet.ops.BACKENDS`.
        route: the walk over the token grid, one of :data:`BLOCK_ROUTES`.
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
        route: str = "row",
    ):
        super().__init__()
        if route not in BLOCK_ROUTES:
            raise ValueError(f"BiMambaMixer: route {route!r} is unknown; use one of {BLOCK_ROUTES}")
        self.route = route
        self.dim = dim
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        # The rank as the thin projections run it on the GPU: a multiple of 8, so that their bf16
        # operands' rows are 16-byte aligned. At Vim-T's rank 12, cuBLAS otherwise falls back to
        # kernels for 4-byte alignment, which took an eighth of a training step (H100). The
        # padding's weights are zeros; on the CPU, where alignment costs nothing, there is none,
        # nor under torch.jit.trace: fvcore's FLOP count traces the model, and counts the model's
        # projections, not the padded ones (a traced program then runs the unaligned kernels).
        self._aligned_dt_rank = -(-self.dt_rank // 8) * 8
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
        if route == "cross":  # the column routes' own parameters (not in released files)
            self.conv1d_c, self.x_proj_c, self.dt_proj_c, self.A_c_log, self.D_c = _scan_direction(
                **direction
            )
            self.conv1d_cb, self.x_proj_cb, self.dt_proj_cb, self.A_cb_log, self.D_cb = (
                _scan_direction(**direction)
            )

    def forward(self, hidden: Tensor, grid: Tuple[int, int] | None = None) -> Tensor:
        """hidden (B, L, dim), its tokens a row-major ``grid`` (H, W) -> (B, L, dim). The grid is
        needed by the column and cross routes only."""
        # Token-major (B, L, E) views; their gradients meet in in_proj's backward GEMMs, not a cat.
        x, z = project_in_parts(self.in_proj, hidden, [self.d_inner] * 2)
        if self.route == "row":
            return self.out_proj(self._scan_both_ways(x, z, None, _ROW_DIRECTIONS))
        if grid is None or grid[0] * grid[1] != hidden.shape[1]:
            raise ValueError(
                f"BiMambaMixer: route {self.route!r} needs the (height, width) token grid of the "
                f"{hidden.shape[1]} tokens, got {grid}"
            )
        columns = column_major_walk(*grid)
        if self.route == "column":
            return self.out_proj(self._scan_both_ways(x, z, columns, _ROW_DIRECTIONS))
        rows = self._scan_both_ways(x, z, None, _ROW_DIRECTIONS)
        return self.out_proj((rows + self._scan_both_ways(x, z, columns, _COLUMN_DIRECTIONS)) / 2)

    def _scan_both_ways(
        self, x: Tensor, z: Tensor, walk: Sequence[int] | None, suffixes: Tuple[str, str]
    ) -> Tensor:
        """The mean of both directions' gated scans along ``walk`` (None: row-major), with the
        parameters named by ``suffixes``; x, z (B, L, E) token-major -> (B, L, E). In training on
        the ``triton`` backend the scan's inputs (u, delta) are recomputed in the backward pass
        instead of kept (:func:`vimdet.ops.bidirectional_selective_scan_recomputing`)."""
        return bidirectional_selective_scan_recomputing(
            functools.partial(self._scan_inputs, walk),
            [x, *self._scan_weights(suffixes)],
            z=z,
            delta_softplus=True,
            walk=walk,
            backend=self.scan_backend,
        )

    def _scan_weights(self, suffixes: Tuple[str, str]) -> List[Tensor]:
        """Both directions' parameters, those named by ``suffixes``, stacked in the order
        :meth:`_scan_inputs` takes: conv taps (2, E, K), conv bias (2, E), x_proj (2, R' + 2N, E),
        dt_proj's weight transposed (2, R', E) and its bias (2, E), A = -exp(A_log) (2, E, N) and
        D (2, E); fp32 where the scan takes fp32 (A, D, dt_proj's bias). R' is the rank, on the GPU
        padded with zeros to a multiple of 8: zero rows before x_proj's and dt_proj's (so that
        dt's first R' - R columns are zeros).

        All of them are views of one concatenation of (rows, E) pieces: one launch, where stacking
        each parameter pair took seven; its backward pass hands each parameter a view of one
        gradient. Under autocast the two projections' weights are cast once. Made once a call: the
        backward pass's recomputation of the scan's inputs takes them as they are."""
        weight = self.x_proj.weight
        aligned = weight.is_cuda and not torch.jit.is_tracing()
        padding = self._aligned_dt_rank - self.dt_rank if aligned else 0
        zeros = [weight.new_zeros((padding, self.d_inner))] if padding else []
        pieces = []
        for suffix in suffixes:
            conv, dt_proj = getattr(self, "conv1d" + suffix), getattr(self, "dt_proj" + suffix)
            pieces += zeros + [getattr(self, "x_proj" + suffix).weight]
            pieces += zeros + [dt_proj.weight.t(), conv.weight.squeeze(1).t(), conv.bias[None]]
            pieces += [dt_proj.bias[None], getattr(self, f"A{suffix}_log").t()]
            pieces += [getattr(self, "D" + suffix)[None]]
        rank, state, taps = self.dt_rank + padding, self.d_state, self.conv1d.weight.shape[-1]
        projections, conv_taps, conv_bias, dt_bias, a_log, skip = (
            torch.cat(pieces)
            .unflatten(0, (2, -1))
            .split([2 * rank + 2 * state, taps, 1, 1, state, 1], dim=1)
        )
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            projections = projections.to(torch.get_autocast_dtype(device_type))
        x_proj, dt_weight = projections.split([rank + 2 * state, rank], dim=1)
        # A in its own (E, N) layout, made here so that the scan op need not copy it (its kernels
        # are faster on that layout).
        A = -torch.exp(a_log.float().transpose(1, 2).contiguous())
        return [
            conv_taps.transpose(1, 2),
            conv_bias.squeeze(1),
            x_proj,
            dt_weight,
            dt_bias.squeeze(1).float(),
            A,
            skip.squeeze(1).float(),
        ]

    def _scan_inputs(
        self,
        walk: Sequence[int] | None,
        x: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor,
        x_proj: Tensor,
        dt_weight: Tensor,
        dt_bias: Tensor,
        A: Tensor,
        skip: Tensor,
    ) -> tuple:
        """(u, delta, A, B, C, D, delta_bias) of both directions from x (B, L, E) and the
        directions' stacked parameters (:meth:`_scan_weights`)."""
        # Both directions' convs + SiLU, token-major: (2, B, L, E). Each projection runs as one
        # matmul a direction over all B * L tokens, batched over the two directions' stacked
        # weights; dt, B and C are views of x_proj's output.
        u = conv_both_directions(x, conv_weight, conv_bias, walk=walk, backend=self.scan_backend)
        tokens, projected = project_sharing_input(u.flatten(1, 2), x_proj)
        u = tokens.view(u.shape)  # the scan's gradient of u then joins x_proj's in one GEMM
        dt, b, c = projected.split([dt_weight.shape[1], self.d_state, self.d_state], dim=-1)
        # delta's bias goes into the scan as delta_bias.
        delta = torch.bmm(dt, dt_weight).view(u.shape)
        batch_and_length = u.shape[1:3]
        b, c = b.unflatten(1, batch_and_length), c.unflatten(1, batch_and_length)
        return u, delta, A, b, c, skip, dt_bias


class AttentionMixer(nn.Module):
    """Global multi-head self-attention over the token grid (Vaswani et al. 2017), in place of
    the Mamba mixer in MambaVision's late blocks (Hatamizadeh & Kautz, arXiv 2407.08083).

    qkv (bias) -> ``F.scaled_dot_product_attention`` over all L tokens per head -> proj (bias).
    Input and output: (B, L, dim); the grid is not needed (the trunk adds the position grid).

    Args:
        dim: width of the token stream.
        num_heads: attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(
                f"AttentionMixer: {num_heads} heads (MODEL.VIM.ATTENTION_HEADS) do not divide the "
                f"width {dim}; pick a divisor of {dim} (e.g. {max(1, dim // 64)})"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        for linear in (self.qkv, self.proj):  # ViT's init
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: Tensor, grid: Tuple[int, int] | None = None) -> Tensor:
        """hidden (B, L, dim) -> (B, L, dim)."""
        batch, length, dim = hidden.shape
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, dim / heads)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer, with the residual stream kept in fp32.

    ``forward(h_prev, residual_prev) -> (h, residual)`` where residual = residual_prev +
    drop_path(h_prev) (or h_prev itself for the first block) and h = mixer(norm(residual)). The
    add and the norm run as one op (:func:`vimdet.ops.add_rms_norm`, fused on the ``triton``
    scan backend) whose output has the dtype the mixer's first GEMM reads (autocast's, else fp32).

    Args:
        dim: width of the token stream.
        drop_path: stochastic-depth rate of this block's residual branch.
        mixer: the token mixer, called as ``mixer(x, grid)``; None builds a
            :class:`BiMambaMixer` from ``scan_backend`` and ``mixer_kwargs``.
        scan_backend: the scan backend, which also picks the add + norm's implementation.
        mixer_kwargs: the rest of :class:`BiMambaMixer`'s arguments.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        mixer: nn.Module | None = None,
        scan_backend: str = "auto",
        **mixer_kwargs,
    ):
        super().__init__()
        if mixer is not None and mixer_kwargs:
            raise ValueError(
                f"VimBlock: got a mixer and BiMambaMixer arguments {sorted(mixer_kwargs)}; pass "
                "one or the other"
            )
        self.scan_backend = scan_backend
        self.norm = RMSNorm(dim)
        self.mixer = (
            mixer
            if mixer is not None
            else BiMambaMixer(dim, scan_backend=scan_backend, **mixer_kwargs)
        )
        self.drop_path = _DropPath(drop_path)

    def forward(
        self, hidden: Tensor, residual: Tensor | None, grid: Tuple[int, int] | None = None
    ) -> Tuple[Tensor, Tensor]:
        """grid: the (H, W) token grid, for mixers that walk it."""
        device_type = hidden.device.type
        normed, residual = add_rms_norm(
            hidden,
            residual,
            self.norm.weight,
            self.norm.eps,
            drop_scale=None if residual is None else self.drop_path.sample_scale(hidden),
            out_dtype=torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else torch.float32,
            backend=self.scan_backend,
        )
        return self.mixer(normed, grid), residual


def _tracing() -> bool:
    """Whether torch.export, torch.compile or torch.jit.trace is tracing: tensors made now are
    fake (export, compile) or recorded (jit)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _cacheable(device: torch.device) -> bool:
    """Whether tensors made now on ``device`` may be cached for later calls: not while the model
    is traced (``_tracing``), nor while a CUDA graph is captured, which would keep reading the
    cached tensor's memory after the weights change or the cache lets it go."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return not (capturing or _tracing())


def _bicubic_matrix(src: int, dst: int, device: torch.device) -> Tensor:
    """(dst, src) weights of PyTorch's 1-D bicubic resize (align_corners=False), as a matrix;
    cached where ``_cacheable``."""
    if not _cacheable(device):
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
    before any norm), channels-last in memory (a view of the token stream).

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
        scan_backend: selective-scan backend, one of :data:`vimdet.ops.BACKENDS`; it also picks
            the norms' kernels here and in :class:`VimFeaturePyramid`'s levels.
        use_checkpoint: recompute each block in the backward pass (activation checkpointing).
        scan_routes: the walks of the Mamba blocks, one of :data:`SCAN_ROUTES`.
        attention_blocks: 1-based blocks whose mixer is :class:`AttentionMixer` instead.
        attention_heads: heads of those mixers; 0 means embed_dim // 64 (at least 1).
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
        scan_routes: str = "row",
        attention_blocks: Sequence[int] = (),
        attention_heads: int = 0,
    ):
        super().__init__()
        out_blocks = tuple(int(k) for k in out_blocks)
        attention_blocks = tuple(sorted({int(k) for k in attention_blocks}))
        if attention_blocks and (attention_blocks[0] < 1 or attention_blocks[-1] > depth):
            raise ValueError(
                f"VisionMamba: attention_blocks {attention_blocks} (MODEL.VIM.ATTENTION_BLOCKS) "
                f"must be 1-based block numbers in [1, depth={depth}]"
            )
        routes = block_routes(scan_routes, depth)
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
        self.scan_backend = scan_backend
        self.scan_routes = scan_routes
        self.attention_blocks = attention_blocks
        self.pretrain_grid = (pretrain_img_size // patch_size,) * 2

        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        grid_size = self.pretrain_grid[0] * self.pretrain_grid[1]
        self.pos_embed = _no_weight_decay(nn.Parameter(torch.zeros(1, grid_size, embed_dim)))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Vim's schedule: block 0 gets 0, block i gets linspace(0, rate, depth)[i - 1].
        rates = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        heads = attention_heads or max(1, embed_dim // 64)
        mamba = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
        self.layers = nn.ModuleList(
            VimBlock(
                embed_dim,
                drop_path=rates[i],
                mixer=AttentionMixer(embed_dim, heads)
                if i + 1 in attention_blocks
                else BiMambaMixer(embed_dim, **mamba, scan_backend=scan_backend, route=routes[i]),
                scan_backend=scan_backend,
            )
            for i in range(depth)
        )
        self._pos_cache: Dict[Tuple, Tensor] = {}

    def position_embedding(self, grid: Tuple[int, int]) -> Tensor:
        """The position grid resized to ``grid``; cached per size while no gradient is needed
        and caching is safe (``_cacheable``)."""
        if grid == self.pretrain_grid:
            return self.pos_embed
        needs_grad = torch.is_grad_enabled() and self.pos_embed.requires_grad
        if needs_grad or not _cacheable(self.pos_embed.device):
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
                hidden, residual = checkpoint(layer, hidden, residual, grid, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, grid)
            if index in self.out_blocks:
                # fp32 by type promotion, in one pass; the token-major (B, L, dim) stream is the
                # map in channels-last memory, viewed as (B, dim, H, W) without a copy (the
                # pyramid's convs and channel norms run channels-last).
                feature = residual + hidden
                outputs[f"block{index}"] = feature.view(
                    feature.shape[0], grid[0], grid[1], self.embed_dim
                ).permute(0, 3, 1, 2)
        return outputs
