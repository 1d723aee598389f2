"""Training, evaluation and visualization around Detectron2's engine."""

from .trainer import VimDetTrainer
from .visualize import draw_predictions, predict_image, to_rgb, write_prediction_pngs

__all__ = [
    "VimDetTrainer",
    "draw_predictions",
    "predict_image",
    "to_rgb",
    "write_prediction_pngs",
]
