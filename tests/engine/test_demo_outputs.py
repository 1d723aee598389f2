"""tools/demo.py never writes over an input or over another output."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_under_test", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def photos(tmp_path):
    for name in ("a/photo.jpg", "b/photo.jpg", "photo.png", "photo.jpg", "other.bmp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"image bytes")
    return tmp_path


def test_inputs_sharing_a_name_get_distinct_outputs(demo, photos):
    inputs = [str(photos / "a"), str(photos / "b"), str(photos), str(photos / "photo.png")]
    paths = demo.list_images(inputs)  # photo.png is named twice and drawn once
    names = demo.output_names(paths)
    assert sorted(names.values()) == [
        "a__photo_jpg.png",
        "b__photo_jpg.png",
        "other.png",
        "photo_jpg.png",
        "photo_png.png",
    ]


@pytest.mark.parametrize("output", [".", "pictures"], ids=["same-folder", "inside"])
def test_output_inside_an_input_folder_is_refused(demo, photos, output):
    with pytest.raises(ValueError, match="is inside the input folder .*Choose an --output"):
        demo.check_output_folder(str(photos / output), [str(photos)])


def test_output_that_would_replace_an_input_file_is_refused(demo, photos):
    inputs = [str(photos / "photo.png")]  # a file, so the folder check does not apply
    with pytest.raises(ValueError, match=r"would be written to .*photo.png', which is the input"):
        demo.plan_outputs(demo.list_images(inputs), str(photos))


def test_no_weights_is_an_error(demo, photos):
    argv = [
        "--config-file",
        str(CONFIG),
        "--input",
        str(photos / "a"),
        "--output",
        str(photos / "o"),
    ]
    with pytest.raises(
        ValueError, match="MODEL.WEIGHTS is empty: the demo would draw an untrained"
    ):
        demo.main(argv)
