"""Training, evaluation and visualization around Detectron2's engine."""

from .setup import build_cfg
from .trainer import VimDetTrainer
from .visualize import draw_predictions, predict_image, to_rgb, write_prediction_pngs

__all__ = [
    "VimDetTrainer",
    "build_cfg",
    "draw_predictions",
    "predict_image",
    "to_rgb",
    "write_prediction_pngs",
]
