"""vimdet.export: a tiny detector and its backbone exported with torch.export (and ONNX) on the
CPU and compared with the eager model; the errors for sizes and backends that cannot be
exported."""

import pytest
import torch
from detectron2.modeling import build_model

from vimdet.config import build_cfg
from vimdet.export import (
    check_export_backend,
    check_export_size,
    export_backbone,
    export_detector,
    instances_from_outputs,
    onnx_translations,
    trace_detector,
)

MICRO = "configs/quick_schedules/cascade_vim_micro_instant_test.yaml"


def micro_detector(*opts):
    torch.manual_seed(0)
    cfg = build_cfg(MICRO, ["MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg).eval()


def test_backbone_export_equals_eager():
    model = micro_detector()
    images = torch.randn(1, 3, 64, 128)
    module, program = export_backbone(model, images)
    with torch.no_grad():
        other = torch.randn(1, 3, 64, 128)  # not the example the program was traced with
        for inputs in (images, other):
            expected = module(inputs)
            actual = program.module()(inputs)
            assert len(actual) == 5  # p2..p6
            for e, a in zip(expected, actual):
                assert e.shape == a.shape
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def shapes_images(count, side=128):
    """``count`` pictures drawn by the built-in dataset's generator, (3, side, side) uint8 RGB."""
    import numpy as np

    from vimdet.data.shapes.draw import draw_image

    rng = np.random.default_rng(0)
    for _ in range(count):
        image, _ = draw_image(rng, side, side, max_objects=4)
        yield torch.as_tensor(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))


def assert_same_detections(actual, expected):
    """Same count and classes, boxes within 1e-3 px, scores within 1e-5."""
    assert len(actual) == len(expected)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(
        actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-3
    )
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=1e-5)


def test_detector_export_equals_eager_on_dataset_images():
    """The whole Cascade R-CNN, exported once with torch.export, gives the eager model's
    detections on pictures of the built-in dataset whose post-processing keeps other numbers of
    boxes (the score threshold sits among the untrained model's scores: 11, 0, 8, 7)."""
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.175")
    images = list(shapes_images(4))
    adapter, program = export_detector(model, images[0])
    run = program.module()
    counts = []
    with torch.no_grad():
        for image in images:
            expected = instances_from_outputs(adapter, adapter(image))
            assert_same_detections(instances_from_outputs(adapter, run(image)), expected)
            counts.append(len(expected))
    assert len(set(counts)) > 2 and 0 in counts


@pytest.mark.slow  # the ONNX translation of the detector takes ~1 min of CPU
def test_detector_onnx_in_onnxruntime_equals_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.172")
    images = list(shapes_images(3))
    adapter, program = export_detector(model, images[0])
    path = str(tmp_path / "detector.onnx")
    torch.onnx.export(
        program, (images[0],), path, dynamo=True, custom_translation_table=onnx_translations()
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for image in images:
            expected = instances_from_outputs(adapter, adapter(image))
            outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
            actual = instances_from_outputs(adapter, [torch.from_numpy(o) for o in outputs])
            assert len(expected) > 0
            assert_same_detections(actual, expected)


def test_size_not_a_multiple_of_the_stride_is_refused():
    with pytest.raises(ValueError, match=r"100x192 is not a multiple .* 64.*export at 128x192"):
        check_export_size(100, 192, 64)
    model = micro_detector()
    with pytest.raises(ValueError, match="not a multiple"):
        export_backbone(model, torch.randn(1, 3, 96, 128))


def test_backends_that_cannot_be_exported_are_refused():
    model = micro_detector("MODEL.VIM.SCAN_BACKEND", "reference")
    with pytest.raises(ValueError, match=r"'reference' backend .* MODEL.VIM.SCAN_BACKEND"):
        check_export_backend(model, torch.device("cpu"))
    chunked = micro_detector()
    check_export_backend(chunked, torch.device("cpu"), onnx=True)  # the ONNX path: no error


@pytest.mark.slow  # the ONNX translation takes ~1 min of CPU at this size
def test_backbone_onnx_in_onnxruntime_equals_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = micro_detector()
    images = torch.randn(1, 3, 64, 128)
    module, _ = export_backbone(model, images)
    path = str(tmp_path / "backbone.onnx")
    torch.onnx.export(module, (images,), path, dynamo=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for inputs in (images, torch.randn(1, 3, 64, 128)):
            expected = module(inputs)
            actual = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
            assert len(actual) == len(expected) == 5
            for e, a in zip(expected, actual):
                torch.testing.assert_close(torch.from_numpy(a), e, rtol=1e-4, atol=1e-4)


def test_traced_detector_equals_eager_on_dataset_images():
    """Detectron2's tracing export of the whole detector holds on pictures it was not traced
    with, whose post-processing keeps other numbers of boxes (the score threshold sits among
    the untrained model's scores): same detections, boxes within 1e-3 px, scores within 1e-5."""
    model = micro_detector("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.168")
    images = list(shapes_images(3))
    adapter, traced = trace_detector(model, images[0])
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "vimdet::bidirectional_scan" in kinds  # the scan is one op in the trace
    with torch.no_grad():
        for image in images:
            expected = instances_from_outputs(adapter, adapter(image))
            assert len(expected) > 0
            assert_same_detections(instances_from_outputs(adapter, traced(image)), expected)
