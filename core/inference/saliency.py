"""Where the model looked: Grad-CAM (the pytorch-grad-cam package) on the last dense block.

The heat map is computed on the image as the model sees it (the run's evaluation pipeline: squashed
to the training size and stain-normalised as the run was; a tiled run is explained on the whole
image at that size), then stretched back over the original image for display. DenseNet-201
downsamples by 32, so a model trained at 224 px gives a 7x7 map; at 32 px the map is a single cell
and carries no location.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from core.data.cache import to_tensor
from core.inference.predict import Predictor
from core.training.loop import preprocess


@dataclass
class Saliency:
    class_index: int  # the class the map explains
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], the display image's size
    overlay: PILImage.Image  # the heat map blended over the display image
    flat: bool  # no location information (e.g. a 1x1 map at 32 px): the overlay shows nothing


def _display_image(image: PILImage.Image, max_side: int) -> PILImage.Image:
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), PILImage.BILINEAR)
    return image


class GradCam:
    """Grad-CAM for one trained run. Holds its own copy of the model, because Grad-CAM adds hooks
    and needs gradients, while the predictor's model may serve other requests at the same time."""

    def __init__(self, predictor: Predictor) -> None:
        model = getattr(predictor.model, "_orig_mod", predictor.model)  # torch.compile's wrapper, if any
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.device = predictor.device
        self.pipeline = predictor.pipeline
        self.classes = predictor.classes
        self.target_layer = self.model.features.denseblock4  # the last dense block
        self._lock = threading.Lock()

    def explain(self, image: PILImage.Image, class_index: int | None = None, max_side: int = 640) -> Saliency:
        """The Grad-CAM map of `class_index` (default: the predicted class) for one RGB image."""
        x = preprocess(to_tensor([self.pipeline.whole(image)]), self.device)
        with self._lock:
            if class_index is None:
                with torch.no_grad():
                    class_index = int(self.model(x).argmax(1).item())
            with GradCAM(model=self.model, target_layers=[self.target_layer]) as cam:
                grey = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]  # (S, S) in [0, 1]
        shown = _display_image(image, max_side)
        grey = np.nan_to_num(grey).astype(np.float32)
        heat = PILImage.fromarray(grey, mode="F").resize(shown.size, PILImage.BILINEAR)
        heatmap = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
        rgb = np.asarray(shown, dtype=np.float32) / 255.0
        overlay = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55)
        return Saliency(class_index, heatmap, PILImage.fromarray(overlay), flat=float(np.ptp(grey)) < 1e-6)
