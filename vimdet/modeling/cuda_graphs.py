"""The backbone's forward and backward replayed as CUDA graphs, one capture per input shape.

ViMDet's trunk launches a few thousand small kernels a training step (24 blocks of norms, convs,
scans and projections, forward and backward). On a GPU with a slow host the launches, not the
kernels, then set the pace: a ViMDet-T step costs the same at 64² as at 1024². A CUDA graph
(NVIDIA, "CUDA Graphs"; PyTorch's ``torch.cuda.CUDAGraph``) records those launches once and
replays them with one call.

As in ``torch.cuda.make_graphed_callables``, a capture records the forward and, when gradients are
wanted, the backward that ``torch.autograd.grad`` runs, into one private memory pool; replays copy
the input into the captured input tensor and return the captured outputs and parameter gradients.
Unlike it, captures are kept per input shape and mode, so that one module serves training,
evaluation and a few image sizes. A graph holds its activations between steps, so inputs of many
sizes (multi-scale training without ``MODEL.VIM_FPN.SQUARE_PAD``) are a poor fit: past
``max_graphs`` captures, new shapes run eagerly, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from itertools import chain, compress
from operator import attrgetter
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["CudaGraphs"]

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager passes before a capture: Triton compilation, cuBLAS workspaces


_REQUIRES_GRAD = attrgetter("requires_grad")
_VERSION = attrgetter("_version")


def _parameters_and_buffers(module: nn.Module) -> Tuple[List[nn.Parameter], List[Tensor]]:
    """``module``'s parameters, tied ones once, and its buffers, in a fixed order, read from the
    submodules' own dicts. :class:`CudaGraphs` needs them at every call; ``module.parameters()``
    and ``module.buffers()``, which build every submodule's qualified name, took several times as
    long (ViMDet-T: 443 parameters, 321 submodules)."""
    owners, seen = [module], {id(module)}
    for owner in owners:  # extended while iterated: every submodule once, breadth first
        for child in owner._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                owners.append(child)
    params = dict.fromkeys(p for owner in owners for p in owner._parameters.values())
    buffers = [b for owner in owners for b in owner._buffers.values() if b is not None]
    return [p for p in params if p is not None], buffers


def _autocast_state() -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


@contextlib.contextmanager
def _leaf_aliases(
    module: nn.Module, params: Tuple[nn.Parameter, ...]
) -> Iterator[Tuple[nn.Parameter, ...]]:
    """``module``'s ``params`` replaced, inside, by new leaves on their memory (yielded in order).

    Autograd hands a leaf its gradient on the stream its AccumulateGrad node was made on.
    DistributedDataParallel keeps the parameters' nodes alive from its construction, on the default
    stream, and a backward pass captured on another stream may not wait on that one (CUDA:
    "operation would make the legacy stream depend on a capturing blocking stream"). New leaves
    get new nodes on the capture's stream; sharing the parameters' memory, the graphs still read
    the weights that the optimizer updates in place. Tied parameters share one alias.
    """
    aliases: Dict[int, nn.Parameter] = {id(p): nn.Parameter(p.detach()) for p in params}
    swapped = []
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None and id(param) in aliases:
                swapped.append((owner, name, param))
    for owner, name, param in swapped:
        owner._parameters[name] = aliases[id(param)]
    try:
        yield tuple(aliases[id(p)] for p in params)
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


class _Capture:
    """One input shape and mode of ``run``: its forward graph and, with ``params`` to train, the
    graph of the backward pass from every output to them.

    Args:
        module: the module whose parameters ``run`` reads.
        run: the captured function, ``run(x) -> pytree of tensors``.
        params: the parameters of ``module`` gradients flow to (empty: forward only).
        sample: an input of the shape and dtype to capture.
    """

    def __init__(
        self,
        module: nn.Module,
        run: Callable[[Tensor], object],
        params: Tuple[nn.Parameter, ...],
        sample: Tensor,
    ):
        self.pending: Callable[[], object] | None = None  # the replay awaiting its backward
        self.input = sample.detach().clone()
        # The memory of every weight the graphs read, held while they exist: a replay launched
        # before CudaGraphs checks the weights may read weights that have since moved, and their
        # old memory must still be allocated (it is only read; its results are then discarded).
        self.weights = [t.detach() for t in chain(*_parameters_and_buffers(module))]
        versions = list(map(_VERSION, self.weights))
        enabled, dtype = _autocast_state()
        # Autocast's cache of cast weights would leak eager tensors into the graph (PyTorch's
        # make_graphed_callables refuses it for this reason); casts are recorded in the graph.
        # The warm-up and captures use leaf aliases of the parameters, whose AccumulateGrad nodes
        # are made on the capture's stream (DDP holds the parameters' own, on the default one).
        # Errors are thread-local: other threads' CUDA calls (NCCL's watchdog polling its
        # events) do not break the capture.
        with (
            torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False),
            _leaf_aliases(module, params) as self.params,
        ):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    outputs = tree_flatten(run(self.input))[0]
                    self._gradients(outputs, [torch.ones_like(o) for o in outputs])
                    # Dropped before the next pass: outputs hold autograd's graph, and with it
                    # whatever its nodes keep after their backward pass.
                    del outputs
            torch.cuda.current_stream().wait_stream(side)
            # Captured on the warm-up stream, as make_graphed_callables does.
            self.forward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                self.forward_graph, stream=side, capture_error_mode="thread_local"
            ):
                outputs, self.spec = tree_flatten(run(self.input))
            self.outputs = tuple(outputs)
            self.backward_graph = None
            if params:
                self.output_grads = tuple(torch.empty_like(o) for o in outputs)
                self.backward_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    self.backward_graph,
                    pool=self.forward_graph.pool(),
                    stream=side,
                    capture_error_mode="thread_local",
                ):
                    self.grads = self._gradients(self.outputs, self.output_grads)
                # Drop the captured autograd graph: replays build their own.
                self.outputs = tuple(o.detach() for o in self.outputs)
        # A run that writes to its weights in place (a norm's running statistics) would, replayed
        # on moved weights, write into memory that may still be a user's: its replays wait for
        # the check.
        self.launch_before_check = versions == list(map(_VERSION, self.weights))

    def _gradients(self, outputs, output_grads) -> Tuple[Tensor | None, ...]:
        if not self.params:
            return ()
        trained = [(o, g) for o, g in zip(outputs, output_grads) if o.requires_grad]
        return torch.autograd.grad(
            [o for o, _ in trained], self.params, [g for _, g in trained], allow_unused=True
        )

    def busy(self) -> bool:
        """Whether the last replay's outputs still await its backward pass."""
        return self.pending is not None and self.pending() is not None

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.input.copy_(x)
        self.forward_graph.replay()
        return self.outputs

    def backward(self, grads: Tuple[Tensor | None, ...]) -> Tuple[Tensor | None, ...]:
        for static, grad in zip(self.output_grads, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        self.backward_graph.replay()
        # Fresh copies, so that gradients outlive the next replay (accumulation over steps works):
        # a multi-tensor kernel (x * 1 is exact) instead of one launch a parameter.
        present = [g for g in self.grads if g is not None]
        copies = iter(torch._foreach_mul(present, 1.0) if present else ())
        return tuple(next(copies) if g is not None else None for g in self.grads)


class _Replay(torch.autograd.Function):
    """Autograd's view of a capture whose forward graph has been replayed: inputs the trained
    parameters, outputs the captured outputs, backward the backward graph's replay."""

    @staticmethod
    def forward(ctx, capture: _Capture, *params: Tensor) -> Tuple[Tensor, ...]:
        ctx.capture = capture
        # Until its backward pass runs, this replay's outputs and activations are the graph's
        # memory: another replay would overwrite them (``CudaGraphs`` runs eagerly meanwhile).
        capture.pending = weakref.ref(ctx)
        return tuple(o.detach() for o in capture.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple:
        ctx.capture.pending = None
        return (None, *ctx.capture.backward(grads))


class CudaGraphs:
    """Runs ``run(x)`` of ``module`` through CUDA graphs, one per input shape and mode.

    A capture is keyed by the input's shape, dtype and device, the module's training flag, whether
    gradients are wanted, inference mode and the autocast state. In training its outputs are the
    graph's own tensors, valid until the same capture replays again (the next step, after the
    backward pass); without gradients they are copied out. Parameter gradients are always fresh
    tensors. A call replays the forward graph that the last call's weights select first, and only
    then walks the module for moved weights, while that graph runs; weights that moved drop every
    capture, that replay included.

    Args:
        max_graphs: captures to hold; inputs of further shapes run eagerly (with one warning).
        name: what the log lines call the captured module.
    """

    def __init__(self, max_graphs: int, name: str = "backbone"):
        if max_graphs < 1:
            raise ValueError(f"CudaGraphs: max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.name = name
        self._captures: Dict[tuple, _Capture] = {}
        self._warned = False
        self._warned_pending = False
        self._weights: tuple = ([], [], [])
        self._trained: Tuple[nn.Parameter, ...] = ()  # the last call's parameters to train

    def __len__(self) -> int:
        return len(self._captures)

    def __getstate__(self) -> dict:
        # Copies and pickles of the model (EMA, torch.save of the module) capture afresh.
        return {"max_graphs": self.max_graphs, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def forget_stale_captures(
        self, module: nn.Module, in_flight: torch.device | None = None
    ) -> Tuple[nn.Parameter, ...]:
        """Drop every capture if ``module``'s parameters or buffers now live in other memory or
        changed ``requires_grad`` (``.to(dtype)``, ``load_state_dict(assign=True)``, freezing): a
        graph reads the memory it was captured with, so it would silently use stale weights.
        ``in_flight``: the device of a replay launched before this check, waited for before its
        graph goes. Returns ``module``'s parameters that require gradients, found by the same
        walk."""
        params, buffers = _parameters_and_buffers(module)
        requires_grad = list(map(_REQUIRES_GRAD, params))
        weights = (
            list(map(Tensor.data_ptr, params)),
            requires_grad,
            list(map(Tensor.data_ptr, buffers)),
        )
        if weights != self._weights:
            if self._captures:
                logger.info(
                    "The %s's weights moved or changed requires_grad: its %d CUDA graphs are "
                    "dropped and will be captured again",
                    self.name,
                    len(self._captures),
                )
                if in_flight is not None:
                    torch.cuda.synchronize(in_flight)
                self._captures.clear()
                self._warned = False
            self._weights = weights
        # A parameter re-wrapped on the same memory keeps the graphs; gradients go to the new
        # object.
        self._trained = tuple(compress(params, requires_grad))
        return self._trained

    def _key(self, module: nn.Module, x: Tensor, params: Tuple[nn.Parameter, ...]) -> tuple:
        return (
            tuple(x.shape),
            x.dtype,
            x.device,
            module.training,
            bool(params) and torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            _autocast_state(),
        )

    def _launch_before_check(self, module: nn.Module, x: Tensor) -> _Capture | None:
        """Replays the forward graph that the weights found by the last call select, before this
        call's check of the weights (``forget_stale_captures``), which then runs on the host while
        the graph runs on the GPU (ViMDet-T at 1024², on an H100's host: 1.4 ms, 5% of its
        training step). If the weights moved, the check drops the graphs and the replay's outputs
        are never used."""
        if x.requires_grad:
            return None
        capture = self._captures.get(self._key(module, x, self._trained))
        if capture is None or not capture.launch_before_check or capture.busy():
            return None
        capture.forward(x)
        return capture

    def __call__(self, module: nn.Module, run: Callable[[Tensor], object], x: Tensor):
        launched = self._launch_before_check(module, x)
        params = self.forget_stale_captures(module, x.device if launched else None)
        if x.requires_grad:  # the graphs give no gradient to the input
            return run(x)
        if not torch.is_grad_enabled():
            params = ()
        key = self._key(module, x, params)
        capture = self._captures.get(key)
        if capture is None:
            if len(self._captures) >= self.max_graphs:
                self._warn_full(x)
                return run(x)
            capture = self._capture(module, run, params, x, key)
        if capture is not launched:
            if capture.busy():
                self._warn_pending()
                return run(x)
            capture.forward(x)
        if not params:
            return tree_unflatten([o.clone() for o in capture.outputs], capture.spec)
        # Autograd's bookkeeping of the parameters (hundreds of inputs) runs on the host while the
        # forward graph, already launched, runs on the GPU.
        return tree_unflatten(list(_Replay.apply(capture, *params)), capture.spec)

    def _capture(self, module: nn.Module, run, params, x: Tensor, key: tuple) -> _Capture:
        started = time.perf_counter()
        with torch.cuda.device(x.device):
            capture = _Capture(module, run, params, x)
        self._captures[key] = capture
        logger.info(
            "CUDA graph %d/%d of the %s captured in %.1f s: input %s %s, %s%s",
            len(self._captures),
            self.max_graphs,
            self.name,
            time.perf_counter() - started,
            tuple(x.shape),
            str(x.dtype).removeprefix("torch."),
            "training" if key[3] else "evaluation",
            " with its backward pass" if params else ", forward only",
        )
        return capture

    def _warn_pending(self) -> None:
        if not self._warned_pending:
            self._warned_pending = True
            logger.warning(
                "The %s ran again before the backward pass of its previous CUDA graph replay "
                "(two forward passes, one backward): this forward runs eagerly, so that the first "
                "one's activations stay intact.",
                self.name,
            )

    def _warn_full(self, x: Tensor) -> None:
        if self._warned:
            return
        self._warned = True
        shapes: List[tuple] = [k[0] for k in self._captures]
        logger.warning(
            "The %s holds its %d CUDA graphs (inputs %s); input %s and other new shapes run "
            "eagerly. Inputs of one size (MODEL.VIM_FPN.SQUARE_PAD) need one graph per mode; or "
            "raise MODEL.VIM_FPN.CUDA_GRAPHS (each training graph keeps its activations).",
            self.name,
            self.max_graphs,
            shapes,
            tuple(x.shape),
        )
