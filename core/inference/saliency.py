"""Where the model looked: Grad-CAM (the pytorch-grad-cam package) on a dense block of the model.

The heat map is computed on the image as the model sees it (the run's evaluation pipeline: squashed
to the training size and stain-normalised as the run was; a tiled run is explained on the whole
image at that size), then laid back over the original image for display.

Which layer: DenseNet-201's last dense block is the most specific to the classes, but it lies 32x
below the input, so a model trained at 64 px gives a 2x2 map: four cells stretched over a whole
image, which can point at nothing. Dense blocks 3 and 2 lie 16x and 8x below the input (2x and 4x
the resolution). The map is taken on the deepest block that gives at least MIN_CELLS x MIN_CELLS
cells at the run's image size (224 px: block 4, 7x7; 128 px: block 3, 8x8; 64 px: block 2, 8x8);
where none does (under 53 px), the finest of them (block 2: 4x4 at 32 px, where block 4 is a single
cell). Blocks earlier still are finer but see edges and colours rather than the classes. `coarse`
marks a map under MIN_CELLS cells a side, so that the display says it cannot point at structures.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from core.data.cache import to_tensor
from core.training.loop import preprocess

MIN_CELLS = 7  # cells a side below which a map cannot point at cells or structures (the paper's 224 px: 7x7)
# (module name in DenseNet's features, its name for a reader, how far below the input it lies), deepest first.
LAYERS = (
    ("denseblock4", "the last dense block (block 4)", 32),
    ("denseblock3", "dense block 3", 16),
    ("denseblock2", "dense block 2", 8),
)


@dataclass
class Saliency:
    class_index: int  # the class the map explains
    cells: np.ndarray  # (h, w) float32 in [0, 1]: the map as computed, one value per cell of the layer
    heatmap: np.ndarray  # (H, W) float32 in [0, 1]: the cells stretched to the display image's size
    image: PILImage.Image  # the display image (the original, scaled down to at most max_side)
    overlay: PILImage.Image  # the heat map blended over the display image
    layer: str  # which layer the map was taken on, in words
    flat: bool  # the same value everywhere (no gradient reached the layer): the map shows nothing

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the map's cells."""
        return int(self.cells.shape[0]), int(self.cells.shape[1])

    @property
    def coarse(self) -> bool:
        """Too few cells (under MIN_CELLS a side) to point at cells or structures."""
        return min(self.grid) < MIN_CELLS


def grid_side(image_size: int, stride: int) -> int:
    """Cells a side of the DenseNet feature map `stride`x below an input of `image_size` px: the stem
    (a stride-2 convolution and a stride-2 max-pool) rounds up, each transition's 2x2 pooling down."""
    half = (image_size + 1) // 2  # after the stride-2 convolution
    side = (half + 1) // 2  # after the stride-2 max-pool: stride 4
    return side // (stride // 4)


def choose_layer(image_size: int, present: Collection[str] | None = None) -> tuple[str, str]:
    """(module name, name in words) of the layer to explain a model trained at `image_size` px on,
    among the blocks `present` in its features (default: all of DenseNet-201's)."""
    layers = [layer for layer in LAYERS if present is None or layer[0] in present]
    if not layers:
        raise ValueError(f"the model's features have none of the blocks {[name for name, _, _ in LAYERS]}")
    for module, words, stride in layers:
        if grid_side(image_size, stride) >= MIN_CELLS:
            return module, words
    return layers[-1][0], layers[-1][1]


class _CellGradCAM(GradCAM):
    """GradCAM that returns the map at the layer's own resolution (its cells), not resized to the
    input: the display draws the cells as they are, and the resize happens once, for the overlay."""

    def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
        activations = self.activations_and_grads.activations[-1]
        return int(activations.shape[-1]), int(activations.shape[-2])


def _display_image(image: PILImage.Image, max_side: int) -> PILImage.Image:
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), PILImage.BILINEAR
        )
    return image


class GradCam:
    """Grad-CAM for one trained run. Holds its own copy of the torch model, because Grad-CAM adds
    hooks and needs gradients, while the predictor's model may serve other requests at the same time.

    Accepts either predictor of core/inference/engine.py: Grad-CAM needs the torch network's
    gradients, so an ONNX Runtime predictor gives its torch counterpart (`torch_predictor()`)."""

    def __init__(self, predictor) -> None:
        if hasattr(predictor, "torch_predictor"):
            predictor = predictor.torch_predictor()
        model = getattr(predictor.model, "_orig_mod", predictor.model)  # torch.compile's wrapper, if any
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = predictor.device
        self.pipeline = predictor.pipeline
        self.classes = predictor.classes
        module, self.layer = choose_layer(self.pipeline.image_size, dict(self.model.features.named_children()))
        self.target_layer = getattr(self.model.features, module)
        # Grad-CAM needs the gradient of the class score at the target layer's output only: the
        # graph starts there (registered before Grad-CAM's own hooks, which then see this output),
        # so the backward pass computes no weight gradients and stops at the layer.
        self.target_layer.register_forward_hook(lambda _module, _args, output: output.detach().requires_grad_(True))
        self._lock = threading.Lock()

    def explain(self, image: PILImage.Image, class_index: int | None = None, max_side: int = 640) -> Saliency:
        """The Grad-CAM map of `class_index` (default: the predicted class) for one RGB image."""
        x = preprocess(to_tensor([self.pipeline.whole(image)]), self.device)
        with self._lock:
            if class_index is None:
                with torch.no_grad():
                    class_index = int(self.model(x).argmax(1).item())
            with _CellGradCAM(model=self.model, target_layers=[self.target_layer]) as cam:
                cells = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]  # (h, w) in [0, 1]
        shown = _display_image(image, max_side)
        cells = np.clip(np.nan_to_num(cells), 0.0, 1.0).astype(np.float32)
        heat = PILImage.fromarray(cells, mode="F").resize(shown.size, PILImage.BILINEAR)
        heatmap = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
        rgb = np.asarray(shown, dtype=np.float32) / 255.0
        overlay = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55)
        return Saliency(
            class_index,
            cells,
            heatmap,
            shown,
            PILImage.fromarray(overlay),
            self.layer,
            flat=float(np.ptp(cells)) < 1e-6,
        )
