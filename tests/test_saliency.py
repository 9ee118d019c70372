"""Grad-CAM on a dense block with enough cells (pytorch-grad-cam)."""

import copy

import pytest
import torch

from core.inference.predict import Predictor
from core.inference.saliency import MIN_CELLS, GradCam, choose_layer, grid_side
from core.training.model import PaperDenseNet
from core.transforms.pipelines import EvalPipeline
from tests.synthetic import synthetic_image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PaperDenseNet(3).eval()


@pytest.mark.parametrize("size, grid, coarse", [(64, (8, 8), False), (32, (4, 4), True)])  # both on dense block 2
def test_heat_map_covers_the_image_in_cells_of_a_block_fine_enough(model, size, grid, coarse):
    predictor = Predictor(model, ["CLL", "FL", "MCL"], EvalPipeline(image_size=size), torch.device("cpu"))
    image = synthetic_image("FL", 1, (300, 200))
    result = GradCam(predictor).explain(image, class_index=2, max_side=150)
    assert result.class_index == 2
    assert result.overlay.size == result.image.size == (150, 100) and result.heatmap.shape == (100, 150)
    assert 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    # The last block is 2x2 at 64 px and 1x1 at 32 px; dense block 2 gives 8x8 and 4x4 cells, and 4x4
    # is still too coarse to point at structures.
    assert result.layer == "dense block 2" and result.grid == result.cells.shape == grid
    assert result.coarse == coarse and not result.flat
    assert result.cells.max() == pytest.approx(1.0)  # relative to the strongest cell
    # Grad-CAM works on its own copy: the predictor's model keeps no hooks.
    assert not any(block._forward_hooks for block in model.features.children())


def test_default_class_is_the_predicted_one(model):
    predictor = Predictor(model, ["CLL", "FL", "MCL"], EvalPipeline(image_size=64), torch.device("cpu"))
    image = synthetic_image("MCL", 2)
    assert GradCam(predictor).explain(image).class_index == int(predictor.probabilities([image])[0].argmax())


@pytest.mark.parametrize(
    "size, module, side",
    [
        (224, "denseblock4", 7),
        (128, "denseblock3", 8),
        (96, "denseblock2", 12),
        (64, "denseblock2", 8),
        (32, "denseblock2", 4),
    ],
)
def test_the_map_is_taken_on_the_deepest_block_with_at_least_7x7_cells(size, module, side):
    chosen, _ = choose_layer(size)
    assert (
        chosen == module and grid_side(size, {"denseblock4": 32, "denseblock3": 16, "denseblock2": 8}[module]) == side
    )
    # The last block is 2x2 at 64 px: too coarse, so an earlier one (finer) is taken.
    assert (grid_side(size, 32) >= MIN_CELLS) == (module == "denseblock4")


def test_a_map_without_any_gradient_is_flat(model):
    silent = copy.deepcopy(model)
    torch.nn.init.zeros_(silent.head[-1].weight)  # no class score depends on the features
    predictor = Predictor(silent, ["CLL", "FL", "MCL"], EvalPipeline(image_size=64), torch.device("cpu"))
    result = GradCam(predictor).explain(synthetic_image("FL", 4), class_index=1, max_side=64)
    assert result.flat and not result.heatmap.any()


def test_grad_cam_takes_the_torch_model_of_an_onnx_runtime_predictor(model):
    """The engine's ONNX Runtime predictor has no gradients; it gives its torch counterpart."""
    torch_one = Predictor(model, ["CLL", "FL", "MCL"], EvalPipeline(image_size=64), torch.device("cpu"))

    class OnnxLike:  # the interface of core/inference/onnx_predict.py's predictor, without ONNX Runtime
        classes, pipeline = torch_one.classes, torch_one.pipeline

        def torch_predictor(self):
            return torch_one

    cam = GradCam(OnnxLike())
    assert cam.pipeline is torch_one.pipeline and cam.model is not model  # a copy of the torch model
    assert all(torch.equal(a, b) for a, b in zip(cam.model.state_dict().values(), model.state_dict().values()))
    assert cam.explain(synthetic_image("MCL", 5), class_index=2, max_side=64).grid == (8, 8)
