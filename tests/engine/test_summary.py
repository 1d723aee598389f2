"""The end-of-run summary: AP before and after training, weights, pictures, demo command."""

from vimdet.engine.summary import bbox_metrics, format_summary

TRAINED = {"AP": 23.456, "AP50": 45.01, "AP75": 20.0}
UNTRAINED = {"AP": 0.0123, "AP50": 0.05}


def summary(**overrides):
    kwargs = dict(
        dataset_name="vimdet_shapes_demo_val",
        num_images=200,
        trained=TRAINED,
        untrained=UNTRAINED,
        weights="output/demo_shapes/model_final.pth",
        pictures=["output/demo_shapes/predictions/000001.png"] * 3,
        python=".venv/bin/python",
        config_file="configs/shapes/cascade_vim_mini_shapes.yaml",
        minutes=9.46,
    )
    kwargs.update(overrides)
    return format_summary(**kwargs)


def test_summary_reports_ap_baseline_pictures_and_demo_command():
    text = summary()
    assert "box AP on vimdet_shapes_demo_val (200 images): AP 23.5, AP50 45.0" in text
    assert "untrained:  AP 0.0, AP50 0.1" in text
    assert "(9.5 min)" in text
    assert "output/demo_shapes/predictions/ (3 PNGs)" in text
    assert (
        ".venv/bin/python tools/demo.py --config-file configs/shapes/cascade_vim_mini_shapes.yaml"
        " --input path/to/your/images --output output/my_predictions"
        " MODEL.WEIGHTS output/demo_shapes/model_final.pth"
    ) in text
    assert len(text.splitlines()) <= 10  # read at a glance


def test_summary_without_baseline_detections_or_pictures():
    nan = float("nan")
    text = summary(untrained=None, trained={"AP": nan, "AP50": nan}, pictures=[])
    assert "untrained:  not evaluated" in text
    assert "(200 images): no detections (AP 0)" in text
    assert "pictures" not in text


def test_absolute_paths_inside_the_working_folder_are_shown_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = summary(weights=str(tmp_path / "out" / "model_final.pth"), python="/usr/bin/python3")
    assert "trained weights: out/model_final.pth" in text
    assert "/usr/bin/python3 tools/demo.py" in text


def test_bbox_metrics_reads_flat_and_nested_results():
    assert bbox_metrics({"bbox": TRAINED}, "a") == TRAINED
    assert bbox_metrics({"a": {"bbox": TRAINED}, "b": {"bbox": UNTRAINED}}, "b") == UNTRAINED
    assert bbox_metrics(None, "a") is None


def test_a_run_started_from_weights_names_them_beside_the_baseline():
    text = summary(start_weights="vimdet://vim_mini_shapes_trunk.pth")
    assert "before training (from vimdet://vim_mini_shapes_trunk.pth): AP 0.0, AP50 0.1" in text
    assert "untrained" not in text
