"""Detectron2's detector inference with no Python branch on tensor values, for ``torch.export``.

``torch.export`` traces one graph for every input: a size that depends on the data (how many
boxes are finite, non-empty, over the score threshold, kept by NMS) becomes an *unbacked*
symbol, and a Python ``if`` on it cannot be traced. Detectron2's inference has such branches
only in its post-processing; each function here is the Detectron2 function it names with those
branches replaced by branch-free operations that select the same rows:

- ``if not valid_mask.all(): boxes = boxes[valid_mask]`` becomes ``boxes[valid_mask]`` always
  (indexing with an all-true mask selects every row, in order: the same result);
- ``if keep.sum().item() != len(boxes): boxes = boxes[keep]`` likewise;
- ``Boxes(tensor)`` checks ``tensor.numel() == 0``: :func:`as_boxes` wraps a tensor without it;
- ``Boxes.clip``'s ``assert torch.isfinite(boxes).all()`` is dropped: on boxes with NaN or inf
  eager raises and the program returns them clipped (the RPN's are removed before, as in eager);
- NMS is ``vimdet::nms`` (torchvision's, with a fake kernel that allows 0 or 1 kept boxes:
  vimdet/ops/nms.py);
- torchvision's ``batched_nms`` picks its algorithm by the number of boxes and returns early on
  none: :func:`batched_nms` is its offset algorithm (the one it always takes under tracing)
  without the early return. On more than 1000 boxes (CPU) eager loops over the classes instead;
  both keep the same boxes except where an IoU lies within float rounding of the threshold.

The orchestration (:func:`rpn_proposals`, :func:`cascade_detections`) is the inference half of
Detectron2's ``RPN.forward`` and ``CascadeROIHeads._forward_box`` calling these functions; the
modules' own layers and helpers (heads, anchors, box decoding, ROI pooling) are called as they
are. Eager training and inference do not use this module.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from vimdet.ops.nms import nms

__all__ = [
    "as_boxes",
    "batched_nms",
    "cascade_detections",
    "clip_boxes",
    "export_inference",
    "fast_rcnn_inference_single_image",
    "find_top_rpn_proposals",
    "pool_boxes",
    "as_instances",
    "rpn_proposals",
]

ImageSize = Tuple[int, int]


def as_boxes(tensor: Tensor) -> Boxes:
    """``Boxes(tensor)`` for an (R, 4) float tensor, without the constructor's branch on
    ``tensor.numel() == 0`` (which only reshapes an empty tensor to (0, 4))."""
    boxes = Boxes(tensor.new_zeros((0, 4)))
    boxes.tensor = tensor
    return boxes


def clip_boxes(boxes: Tensor, image_size: ImageSize) -> Tensor:
    """``Boxes.clip`` without its finiteness assert: (R, 4) XYXY boxes clamped to the image,
    x to [0, width], y to [0, height]."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack(
        (
            x1.clamp(min=0, max=width),
            y1.clamp(min=0, max=height),
            x2.clamp(min=0, max=width),
            y2.clamp(min=0, max=height),
        ),
        dim=-1,
    )


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups (Detectron2's ``batched_nms``: boxes as float, torchvision's offset
    algorithm, without its early return on no boxes). ``boxes`` (R, 4) XYXY with coordinates
    >= 0 (clipped), ``scores`` (R,), ``groups`` (R,) integer ids; returns the indices kept,
    by decreasing score.

    Each group is moved by ``group * (max coordinate + 1)`` so boxes of different groups never
    overlap; the maximum is taken with a 0 appended, which is the same on clipped boxes and
    defined on none."""
    boxes = boxes.float()
    largest = torch.cat((boxes.reshape(-1), boxes.new_zeros(1))).max()
    offsets = groups.to(boxes) * (largest + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def as_instances(image_size: ImageSize, **fields) -> Instances:
    """``Instances(image_size, **fields)`` without ``Instances.set``'s check that the fields'
    ``len()`` agree: ``len()`` needs an int, and these lengths are data-dependent sizes (the
    fields here are all indexed by the same indices, so their lengths agree)."""
    instances = Instances(image_size)
    instances.get_fields().update(fields)
    return instances


def find_top_rpn_proposals(
    proposals: Sequence[Tensor],
    pred_objectness_logits: Sequence[Tensor],
    image_sizes: Sequence[ImageSize],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> List[Instances]:
    """Detectron2's ``find_top_rpn_proposals`` at inference (the module docstring says what is
    changed). ``proposals``: per level (N, Hi*Wi*A, 4) decoded boxes; ``pred_objectness_logits``:
    per level (N, Hi*Wi*A). Per image: the ``pre_nms_topk`` best of each level, finite, clipped,
    wider and taller than ``min_box_size``, NMS within each level, the ``post_nms_topk`` best;
    returns Instances with ``proposal_boxes`` and ``objectness_logits``."""
    top_scores, top_boxes, levels = [], [], []
    for level, (boxes, logits) in enumerate(zip(proposals, pred_objectness_logits)):
        count = min(logits.shape[1], pre_nms_topk)
        scores, index = logits.topk(count, dim=1)
        top_scores.append(scores)
        top_boxes.append(torch.gather(boxes, 1, index[:, :, None].expand(-1, -1, 4)))
        levels.append(torch.full((count,), level, dtype=torch.int64, device=logits.device))
    top_scores, top_boxes, levels = (
        torch.cat(top_scores, 1),
        torch.cat(top_boxes, 1),
        torch.cat(levels),
    )
    results = []
    for boxes, scores, image_size in zip(top_boxes, top_scores, image_sizes):
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, level = boxes[valid], scores[valid], levels[valid]
        boxes = clip_boxes(boxes, image_size)
        sides = boxes[:, 2:] - boxes[:, :2]  # Boxes.nonempty: width and height > min_box_size
        keep = (sides > min_box_size).all(dim=1)
        boxes, scores, level = boxes[keep], scores[keep], level[keep]
        keep = batched_nms(boxes, scores, level, nms_thresh)[:post_nms_topk]
        results.append(
            as_instances(
                image_size, proposal_boxes=as_boxes(boxes[keep]), objectness_logits=scores[keep]
            )
        )
    return results


def fast_rcnn_inference_single_image(
    boxes: Tensor,
    scores: Tensor,
    image_size: ImageSize,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> Instances:
    """Detectron2's ``fast_rcnn_inference_single_image`` (the module docstring says what is
    changed). ``boxes`` (R, 4 * C') for C' = 1 (class-agnostic) or C classes, ``scores``
    (R, C + 1) with the background last. Keeps the (box, class) pairs scoring over
    ``score_thresh``, NMS per class, the ``topk_per_image`` best (all if negative); returns
    Instances with ``pred_boxes``, ``scores``, ``pred_classes``."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid][:, :-1]
    per_class = boxes.shape[1] // 4
    boxes = clip_boxes(boxes.reshape(-1, 4), image_size).view(-1, per_class, 4)
    passing = scores > score_thresh  # (R, C)
    pairs = passing.nonzero()  # (K, 2): box index, class
    boxes = boxes[pairs[:, 0], 0] if per_class == 1 else boxes[passing]
    scores = scores[passing]
    keep = batched_nms(boxes, scores, pairs[:, 1], nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    return as_instances(
        image_size,
        pred_boxes=as_boxes(boxes[keep]),
        scores=scores[keep],
        pred_classes=pairs[keep, 1],
    )


def rpn_proposals(
    rpn: RPN, image_sizes: Sequence[ImageSize], features: Dict[str, Tensor]
) -> List[Instances]:
    """The proposals of Detectron2's ``RPN`` at inference (``rpn.forward`` in eval mode)."""
    maps = [features[name] for name in rpn.in_features]
    anchors = rpn.anchor_generator(maps)
    logits, deltas = rpn.rpn_head(maps)
    box_dim = rpn.anchor_generator.box_dim
    # (N, A, H, W) -> (N, H*W*A) and (N, A*B, H, W) -> (N, H*W*A, B), Detectron2's orders
    logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
    deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
        .permute(0, 3, 4, 1, 2)
        .flatten(1, -2)
        for x in deltas
    ]
    return find_top_rpn_proposals(
        rpn._decode_proposals(anchors, deltas),
        logits,
        image_sizes,
        rpn.nms_thresh,
        rpn.pre_nms_topk[False],
        rpn.post_nms_topk[False],
        rpn.min_box_size,
    )


def pool_boxes(pooler: ROIPooler, maps: Sequence[Tensor], boxes: Tensor) -> Tensor:
    """Detectron2's ``ROIPooler.forward`` for one image: (R, C, S, S) features of the (R, 4)
    ``boxes`` from the level each box is assigned to (``assign_boxes_to_levels``). Written out
    because ``convert_boxes_to_pooler_format`` makes a tensor of the boxes' count with
    ``torch.as_tensor([len(boxes)])``, which needs an int."""
    rois = torch.cat((boxes.new_zeros((boxes.shape[0], 1)), boxes), dim=1)  # (R, 5): image 0
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](maps[0], rois)
    levels = assign_boxes_to_levels(
        [as_boxes(boxes)],
        pooler.min_level,
        pooler.max_level,
        pooler.canonical_box_size,
        pooler.canonical_level,
    )
    size = pooler.output_size
    pooled = maps[0].new_zeros((boxes.shape[0], maps[0].shape[1], size[0], size[1]))
    for level, level_pooler in enumerate(pooler.level_poolers):
        index = (levels == level).nonzero()[:, 0]
        pooled.index_put_((index,), level_pooler(maps[level], rois[index]))
    return pooled


def cascade_detections(
    heads: CascadeROIHeads, features: Dict[str, Tensor], proposals: Instances
) -> Instances:
    """The detections of Detectron2's ``CascadeROIHeads`` box heads at inference
    (``heads._forward_box`` in eval mode) for one image: each stage refines the previous stage's
    boxes (clipped), the scores are the mean of the stages' class probabilities, the boxes the
    last stage's. The predictors' ``predict_boxes`` and ``predict_probs`` are written out here
    (decoding, softmax or sigmoid) because they split by ``len(proposals)``."""
    maps = [features[name] for name in heads.box_in_features]
    image_size = proposals.image_size
    boxes = proposals.proposal_boxes.tensor
    probabilities = []
    for stage in range(heads.num_cascade_stages):
        if stage > 0:
            boxes = clip_boxes(boxes, image_size)
        pooled = pool_boxes(heads.box_pooler, maps, boxes)
        predictor = heads.box_predictor[stage]
        logits, deltas = predictor(heads.box_head[stage](pooled))
        probabilities.append(logits.sigmoid() if predictor.use_sigmoid_ce else logits.softmax(-1))
        boxes = predictor.box2box_transform.apply_deltas(deltas, boxes)
    return fast_rcnn_inference_single_image(
        boxes,
        sum(probabilities) * (1.0 / heads.num_cascade_stages),
        image_size,
        predictor.test_score_thresh,
        predictor.test_nms_thresh,
        predictor.test_topk_per_image,
    )


def export_inference(model: nn.Module, inputs: List[Dict[str, Tensor]]) -> List[Dict]:
    """GeneralizedRCNN's inference on one image of an already valid size (no padding, no
    rescaling of the boxes) through the functions above: what ``torch.export`` traces."""
    heads = model.roi_heads
    if not isinstance(heads, CascadeROIHeads) or not isinstance(model.proposal_generator, RPN):
        raise ValueError(
            "export: torch.export takes ViMDet's RPN + CascadeROIHeads detector; this model has "
            f"{type(model.proposal_generator).__name__} + {type(heads).__name__} "
            "(use --method trace)"
        )
    if heads.mask_on or heads.keypoint_on:
        raise ValueError(
            "export: torch.export takes the box detector only (MODEL.MASK_ON and "
            "MODEL.KEYPOINT_ON False): Detectron2's mask and keypoint inference split by "
            "len(instances), a data-dependent size export cannot turn into an int (use "
            "--method trace)"
        )
    image = inputs[0]["image"]
    normalized = (image.to(model.pixel_mean) - model.pixel_mean) / model.pixel_std
    image_sizes = [tuple(image.shape[-2:])]
    features = model.backbone(normalized[None])
    proposals = rpn_proposals(model.proposal_generator, image_sizes, features)[0]
    return [{"instances": cascade_detections(model.roi_heads, features, proposals)}]
