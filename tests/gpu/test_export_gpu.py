"""GPU export and FLOP counting with the Triton scan: the exported programs keep
``vimdet::scan_walk`` and ``vimdet::conv_both_directions`` as custom ops and equal the eager
model; fvcore counts the Triton ops as it counts the CPU path. Skipped without CUDA; run on the
GPU machine with `make test-gpu` (about a minute)."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import _IGNORED_OPS
from fvcore.nn import FlopCountAnalysis

from vimdet.config import build_cfg
from vimdet.data.shapes.draw import draw_image
from vimdet.export import (
    export_backbone,
    export_detector,
    instances_from_outputs,
    scan_backends,
    trace_detector,
)
from vimdet.modeling import VisionMamba
from vimdet.ops import triton_available
from vimdet.ops.flops import VIMDET_FLOP_HANDLES

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]

MICRO = "configs/quick_schedules/cascade_vim_micro_instant_test.yaml"
# fp32 on the GPU: the exported graph runs the same kernels; cuDNN may pick other algorithms.
BOX_ATOL, SCORE_ATOL = 1e-2, 1e-4


def micro_detector(*opts):
    torch.manual_seed(0)
    cfg = build_cfg(MICRO, ["MODEL.DEVICE", "cuda", *opts])
    model = build_model(cfg).eval()
    assert scan_backends(model, model.device) == ["triton"]
    return model


def shapes_images(count, side=128):
    rng = np.random.default_rng(0)
    for _ in range(count):
        image, _ = draw_image(rng, side, side, max_objects=4)
        rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
        yield torch.as_tensor(rgb).cuda()


def call_targets(program):
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def assert_same_detections(expected, actual):
    assert len(actual) == len(expected) > 0
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(
        actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=BOX_ATOL
    )
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=SCORE_ATOL)


def test_flops_of_the_triton_ops_equal_the_cpu_count():
    def total(device, backend):
        torch.manual_seed(0)
        trunk = VisionMamba(embed_dim=64, depth=2, out_blocks=(2,), scan_backend=backend)
        trunk = trunk.to(device).eval()
        with torch.no_grad():
            analysis = FlopCountAnalysis(trunk, torch.randn(1, 3, 256, 320, device=device))
            analysis.set_op_handle(**VIMDET_FLOP_HANDLES, **dict.fromkeys(_IGNORED_OPS))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return analysis.total(), analysis.by_operator()

    gpu, gpu_ops = total("cuda", "triton")
    cpu, cpu_ops = total("cpu", "chunked")
    assert gpu == cpu
    assert gpu_ops["scan_walk"] == cpu_ops["bidirectional_scan"] > 0


def test_backbone_export_keeps_the_triton_ops():
    model = micro_detector()
    images = torch.randn(1, 3, 128, 192, device="cuda")
    module, program = export_backbone(model, images)
    targets = call_targets(program)
    assert "vimdet.scan_walk.default" in targets
    assert "vimdet.conv_both_directions.default" in targets
    with torch.no_grad():
        for inputs in (images, torch.randn_like(images)):
            for e, a in zip(module(inputs), program.module()(inputs)):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_detector_export_keeps_the_triton_ops_and_equals_eager():
    """torch.export of the whole detector (vimdet.export.inference), the score threshold among
    the untrained model's scores so that the pictures keep different numbers of boxes."""
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.172")
    images = list(shapes_images(3))
    adapter, program = export_detector(model, images[0])
    targets = call_targets(program)
    assert {"vimdet.scan_walk.default", "vimdet.nms.default"} <= targets
    run = program.module()
    with torch.no_grad():
        for image in images:
            expected = instances_from_outputs(adapter, adapter(image))
            assert_same_detections(expected, instances_from_outputs(adapter, run(image)))


def test_traced_detector_keeps_the_triton_ops_and_equals_eager():
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.168")
    images = list(shapes_images(3))
    adapter, traced = trace_detector(model, images[0])
    assert "vimdet::scan_walk" in {node.kind() for node in traced.inlined_graph.nodes()}
    with torch.no_grad():
        for image in images:
            expected = instances_from_outputs(adapter, adapter(image))
            assert_same_detections(expected, instances_from_outputs(adapter, traced(image)))
