"""A ViMDet detector for deployment: ``torch.export`` programs and ONNX at a fixed input size.

The exported detector takes one (3, H, W) image (the model's input format, any dtype; H and W
fixed at export and multiples of the backbone's size divisibility) and returns, through
Detectron2's :class:`~detectron2.export.TracingAdapter`, the flattened fields of its
``Instances``: boxes (K, 4) in the image's pixels, classes (K,), scores (K,) and the image size.
Inside are the trunk, pyramid, RPN, Cascade heads and their post-processing (box decoding,
score threshold, NMS, top-k); resizing a user's picture to that size is left to the caller.

The scan is exported as it runs: on the ``triton`` backend (GPU) as the custom ops
``vimdet::scan_walk`` and ``vimdet::conv_both_directions``, whose fake kernels give their
shapes; on ``chunked`` as plain PyTorch ops, which ONNX can also take. mamba-ssm's kernel
(``cuda``) is a Python autograd function around a CUDA extension that export cannot trace, and
the ``reference`` loop unrolls to L steps per block: both are refused with a message.

Detectron2's proposal and box post-processing branch on data (``if not valid_mask.all()``,
``keep.sum().item() != len(boxes)``, ``len(instances)``), which ``torch.export`` cannot trace.
:func:`export_detector` exports :func:`vimdet.export.inference.export_inference`, the same
inference with those pieces written without branches: a sound program, whose post-processing
keeps as many boxes as each image needs (data-dependent sizes). :func:`trace_detector` is
Detectron2's own export route, ``torch.jit.trace`` of GeneralizedRCNN's modules, which Detectron2
writes trace-friendly: also sound on any image of the size.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from detectron2.export import TracingAdapter
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from vimdet.export.inference import export_inference
from vimdet.ops import resolve_backend

__all__ = [
    "EXPORTABLE_BACKENDS",
    "ONNX_BACKENDS",
    "check_export_backend",
    "check_export_size",
    "detector_adapter",
    "export_backbone",
    "export_detector",
    "fixed_size_inference",
    "instances_from_outputs",
    "onnx_translations",
    "scan_backends",
    "trace_detector",
]


#: Scan backends whose model ``torch.export`` can carry, and those ONNX can.
EXPORTABLE_BACKENDS = ("triton", "chunked")
ONNX_BACKENDS = ("chunked",)


def check_export_size(height: int, width: int, divisibility: int) -> None:
    """Raise ValueError unless (height, width) is a positive multiple of ``divisibility``."""
    if height <= 0 or width <= 0 or height % divisibility or width % divisibility:
        fit = (
            max(divisibility, -(-height // divisibility) * divisibility),
            max(divisibility, -(-width // divisibility) * divisibility),
        )
        raise ValueError(
            f"export: input size {height}x{width} is not a multiple of the backbone's size "
            f"divisibility {divisibility} (its coarsest stride); export at {fit[0]}x{fit[1]} and "
            "pad images to it (zeros at the bottom and right, as Detectron2 pads)"
        )


def scan_backends(model: nn.Module, device: torch.device) -> List[str]:
    """The scan backends the model's mixers resolve to on ``device`` (one per distinct setting)."""
    requested = {m.scan_backend for m in model.modules() if hasattr(m, "scan_backend")}
    return sorted({resolve_backend(name, device) for name in requested})


def check_export_backend(model: nn.Module, device: torch.device, onnx: bool = False) -> None:
    """Raise ValueError if the model's scan runs on a backend that cannot be exported (to ONNX
    when ``onnx``), naming the backend to use instead."""
    allowed = ONNX_BACKENDS if onnx else EXPORTABLE_BACKENDS
    for name in scan_backends(model, device):
        if name not in allowed:
            target = "ONNX" if onnx else "torch.export"
            reason = {
                "cuda": "mamba-ssm's kernel is an autograd function around a CUDA extension "
                "without a registered op or fake kernel",
                "reference": "its per-step loop would unroll to one op per token",
                "triton": "its Triton kernels are custom ops without an ONNX symbolic",
            }[name]
            raise ValueError(
                f"export: the selective scan runs on the {name!r} backend on {device}, which "
                f"{target} cannot take ({reason}). Set MODEL.VIM.SCAN_BACKEND to one of "
                f"{allowed} (or VIMDET_SCAN_BACKEND)"
            )


def fixed_size_inference(model: nn.Module, inputs: List[Dict[str, Tensor]]) -> List[Dict]:
    """GeneralizedRCNN's inference on one image of an already valid size, without Detectron2's
    data-dependent padding (``ImageList.from_tensors``) and without rescaling the boxes."""
    image = inputs[0]["image"]
    normalized = (image.to(model.pixel_mean) - model.pixel_mean) / model.pixel_std
    images = ImageList(normalized[None], [tuple(image.shape[-2:])])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    return [{"instances": results[0]}]


def detector_adapter(
    model: nn.Module, image: Tensor, inference: Callable = fixed_size_inference
) -> TracingAdapter:
    """Detectron2's TracingAdapter around ``model`` (eval mode) for one (3, H, W) image:
    ``adapter(image)`` returns the flattened Instances (see the module docstring) of
    ``inference(model, [{"image": image}])``."""
    if model.training:
        raise ValueError("export: put the model in eval mode first (model.eval())")
    divisibility = model.backbone.size_divisibility
    check_export_size(image.shape[-2], image.shape[-1], divisibility)
    return TracingAdapter(model, [{"image": image}], inference)


def instances_from_outputs(adapter: TracingAdapter, outputs: Sequence[Tensor]) -> Instances:
    """The Instances an exported adapter's flat outputs stand for."""
    return adapter.outputs_schema(list(outputs))[0]["instances"]


class _BackboneTuple(nn.Module):
    """The backbone with its outputs as a tuple, in ``output_shape()`` order."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.output_shape())

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        features = self.backbone(images)
        return tuple(features[name] for name in self.names)


def export_backbone(
    model: nn.Module, images: Tensor
) -> Tuple[nn.Module, torch.export.ExportedProgram]:
    """``torch.export`` of the trunk and pyramid for normalised (B, 3, H, W) ``images``; returns
    the module exported (outputs p2..p6 as a tuple) and its program."""
    check_export_size(images.shape[-2], images.shape[-1], model.backbone.size_divisibility)
    check_export_backend(model, images.device)
    module = _BackboneTuple(model.backbone).eval()
    with torch.no_grad():
        return module, torch.export.export(module, (images,), strict=False)


def export_detector(
    model: nn.Module, image: Tensor
) -> Tuple[TracingAdapter, torch.export.ExportedProgram]:
    """``torch.export`` of the whole detector (:func:`~vimdet.export.inference.export_inference`)
    for images of ``image``'s shape; returns the adapter (for its output schema) and the
    program."""
    check_export_backend(model, image.device)
    adapter = detector_adapter(model, image, export_inference)
    with torch.no_grad():
        program = torch.export.export(adapter, tuple(adapter.flattened_inputs), strict=False)
    return adapter, program


def trace_detector(
    model: nn.Module, image: Tensor
) -> Tuple[TracingAdapter, torch.jit.ScriptModule]:
    """TorchScript trace (Detectron2's ``--export-method tracing``) of the whole detector for
    images of ``image``'s shape; the scan is one op (``vimdet::bidirectional_scan`` or
    ``vimdet::scan_walk``) on every backend, so loading the file needs ``import vimdet``."""
    adapter = detector_adapter(model, image)
    with torch.no_grad():
        return adapter, torch.jit.trace(adapter, (image,), check_trace=False)


def onnx_translations() -> Dict:
    """``custom_translation_table`` for ``torch.onnx.export`` of an exported detector: its
    ``vimdet::nms`` (vimdet/ops/nms.py) is translated as onnxscript translates
    ``torchvision::nms`` (ONNX ``NonMaxSuppression``)."""
    from onnxscript.function_libs.torch_lib.ops.vision import torchvision_nms

    return {torch.ops.vimdet.nms.default: torchvision_nms}
