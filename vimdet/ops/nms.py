"""Non-maximum suppression as the op ``vimdet::nms``: torchvision's NMS with a fake kernel that
``torch.export`` can rely on.

torchvision's own fake kernel for ``torchvision::nms`` (0.29) makes the number of kept boxes
with ``ctx.create_unbacked_symint()``, whose lower bound is 2: every exported program then
asserts at run time that NMS kept at least 2 boxes, and fails on an image where it kept 0 or 1
(``Runtime assertion failed for expression u17 >= 2``). ``vimdet::nms`` runs
``torchvision.ops.nms`` and declares 0 to N kept boxes. For ONNX it is translated as
``torchvision::nms`` is (ONNX ``NonMaxSuppression``; ``vimdet.export.onnx_translations``).
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

__all__ = ["nms"]


@torch.library.custom_op("vimdet::nms", mutates_args=())
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms``: indices (K,) int64 of the (N, 4) XYXY ``boxes`` kept, by
    decreasing ``scores`` (N,); a box is dropped if its IoU with a kept, higher-scoring box
    exceeds ``iou_threshold``."""
    return torchvision.ops.nms(boxes, scores, iou_threshold)


@nms.register_fake
def _nms_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "nms: boxes must be (N, 4)")
    torch._check(scores.shape == boxes.shape[:1], lambda: "nms: scores must be (N,)")
    kept = torch.library.get_ctx().new_dynamic_size()  # 0 <= kept
    torch._check(kept <= boxes.shape[0])
    return boxes.new_empty((kept,), dtype=torch.int64)
