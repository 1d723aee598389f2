"""vimdet.export.inference: each export-friendly replacement equals the Detectron2 function it
replaces, on the inputs the tiny detector produces for pictures of the built-in dataset; the
whole inference path equals GeneralizedRCNN's."""

import pytest
import torch
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator.proposal_utils import (
    find_top_rpn_proposals as d2_find_top_rpn_proposals,
)
from detectron2.modeling.roi_heads.fast_rcnn import (
    fast_rcnn_inference_single_image as d2_fast_rcnn_inference_single_image,
)
from detectron2.structures import Boxes, ImageList
from test_export import micro_detector, shapes_images
from torchvision.ops import batched_nms as tv_batched_nms

from vimdet.export import detector_adapter, export_inference, instances_from_outputs
from vimdet.export.inference import (
    batched_nms,
    cascade_detections,
    fast_rcnn_inference_single_image,
    find_top_rpn_proposals,
    pool_boxes,
    rpn_proposals,
)

THRESH = "0.172"  # among the untrained model's scores: 41 to 56 detections on these pictures


@pytest.fixture(scope="module")
def stages():
    """The micro detector and, for 2 pictures, its features, RPN outputs (decoded proposals and
    logits, per level) and Detectron2's proposals."""
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", THRESH)
    rpn = model.proposal_generator
    found = []
    with torch.no_grad():
        for image in shapes_images(2):
            images = ImageList(model.preprocess_image([{"image": image}]).tensor, [(128, 128)])
            features = model.backbone(images.tensor)
            maps = [features[name] for name in rpn.in_features]
            logits, deltas = rpn.rpn_head(maps)
            logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
            deltas = [
                x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1])
                .permute(0, 3, 4, 1, 2)
                .flatten(1, -2)
                for x in deltas
            ]
            decoded = rpn._decode_proposals(rpn.anchor_generator(maps), deltas)
            proposals, _ = rpn(images, features)
            found.append((image, features, decoded, logits, proposals[0]))
    return model, found


def assert_same_instances(actual, expected, names):
    assert len(actual) == len(expected)
    for name in names:
        a, e = actual.get(name), expected.get(name)
        a, e = (a.tensor, e.tensor) if isinstance(a, Boxes) else (a, e)
        assert torch.equal(a, e), name


@pytest.mark.parametrize("pre_nms_topk", [300, 1000])  # eager's NMS: offsets; class loop
def test_find_top_rpn_proposals_equals_detectron2(stages, pre_nms_topk):
    model, found = stages
    rpn = model.proposal_generator
    for _, _, decoded, logits, _ in found:
        decoded = [d.clone() for d in decoded]
        best = logits[0][0].argmax()
        decoded[0][0, best, 0] = float("nan")  # a non-finite box, dropped by both
        args = ([(128, 128)], rpn.nms_thresh, pre_nms_topk, 100, 4.0)  # some boxes are small
        expected = d2_find_top_rpn_proposals(decoded, logits, *args[:4], args[4], False)[0]
        actual = find_top_rpn_proposals(decoded, logits, *args)[0]
        assert 0 < len(actual) <= 100
        assert_same_instances(actual, expected, ["proposal_boxes", "objectness_logits"])


def test_rpn_proposals_equal_the_rpn(stages):
    model, found = stages
    for _, features, _, _, proposals in found:
        actual = rpn_proposals(model.proposal_generator, [(128, 128)], features)[0]
        assert_same_instances(actual, proposals, ["proposal_boxes", "objectness_logits"])


def test_pool_boxes_equals_roi_pooler(stages):
    model, found = stages
    heads = model.roi_heads
    for _, features, _, _, proposals in found:
        maps = [features[name] for name in heads.box_in_features]
        large = torch.tensor([[0.0, 0.0, 128.0, 128.0], [10.0, 20.0, 100.0, 90.0]])
        boxes = Boxes(torch.cat((proposals.proposal_boxes.tensor, large)))  # + coarser levels
        pooler = heads.box_pooler
        levels = assign_boxes_to_levels(
            [boxes],
            pooler.min_level,
            pooler.max_level,
            pooler.canonical_box_size,
            pooler.canonical_level,
        )
        assert len(levels.unique()) > 1  # the boxes are pooled from several levels
        expected = heads.box_pooler(maps, [boxes])
        assert torch.equal(pool_boxes(heads.box_pooler, maps, boxes.tensor), expected)


@pytest.mark.parametrize("score_thresh", [0.0, 0.172, 0.5])  # thousands, tens and no pairs
def test_fast_rcnn_inference_equals_detectron2(stages, score_thresh):
    model, found = stages
    heads = model.roi_heads
    predictor = heads.box_predictor[0]
    for _, features, _, _, proposals in found:
        maps = [features[name] for name in heads.box_in_features]
        with torch.no_grad():
            predictions = heads._run_stage(maps, [proposals], 0)
        boxes = predictor.predict_boxes(predictions, [proposals])[0].clone()
        scores = predictor.predict_probs(predictions, [proposals])[0].clone()
        boxes[3, 1] = float("inf")  # a non-finite row, dropped by both
        args = ((128, 128), score_thresh, predictor.test_nms_thresh, 100)
        expected, _ = d2_fast_rcnn_inference_single_image(boxes, scores, *args)
        actual = fast_rcnn_inference_single_image(boxes, scores, *args)
        assert (len(actual) == 0) == (score_thresh == 0.5)
        assert_same_instances(actual, expected, ["pred_boxes", "scores", "pred_classes"])


def test_batched_nms_equals_torchvision(stages):
    _, found = stages
    proposals = found[0][4]
    boxes, scores = proposals.proposal_boxes.tensor, proposals.objectness_logits
    groups = torch.arange(len(boxes)) % 3
    expected = tv_batched_nms(boxes, scores, groups, 0.3)
    assert 0 < len(expected) < len(boxes)
    assert torch.equal(batched_nms(boxes, scores, groups, 0.3), expected)
    none = batched_nms(boxes[:0], scores[:0], groups[:0], 0.3)
    assert none.shape == (0,) and none.dtype == torch.int64


def test_export_inference_equals_the_detector(stages):
    """The whole path (trunk to post-processing) gives GeneralizedRCNN's detections exactly."""
    model, found = stages
    image = found[0][0]
    reference = detector_adapter(model, image)
    adapter = detector_adapter(model, image, export_inference)
    with torch.no_grad():
        for image, features, _, _, proposals in found:
            expected = instances_from_outputs(reference, reference(image))
            actual = instances_from_outputs(adapter, adapter(image))
            assert len(expected) > 0
            assert_same_instances(actual, expected, ["pred_boxes", "scores", "pred_classes"])
            direct = cascade_detections(model.roi_heads, features, proposals)
            assert_same_instances(direct, expected, ["pred_boxes", "scores", "pred_classes"])


def test_mask_heads_are_refused():
    model = micro_detector("MODEL.MASK_ON", "True")
    with pytest.raises(ValueError, match=r"box detector only .* --method trace"):
        export_inference(model, [{"image": torch.zeros(3, 128, 128, dtype=torch.uint8)}])
