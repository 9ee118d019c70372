"""Grad-CAM on the last dense block (pytorch-grad-cam)."""

import pytest
import torch

from core.training.model import PaperDenseNet
from core.inference.predict import Predictor
from core.inference.saliency import GradCam
from core.transforms.pipelines import EvalPipeline
from tests.synthetic import synthetic_image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PaperDenseNet(3).eval()


@pytest.mark.parametrize("size, flat", [(64, False), (32, True)])
def test_heat_map_covers_the_image_and_is_flat_only_without_location(model, size, flat):
    predictor = Predictor(model, ["CLL", "FL", "MCL"], EvalPipeline(image_size=size), torch.device("cpu"))
    image = synthetic_image("FL", 1, (300, 200))
    result = GradCam(predictor).explain(image, class_index=2, max_side=150)
    assert result.class_index == 2
    assert result.overlay.size == (150, 100) and result.heatmap.shape == (100, 150)
    assert 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    assert result.flat == flat  # at 32 px the last block is 1x1: no location to show
    # Grad-CAM works on its own copy: the predictor's model keeps no hooks.
    assert not model.features.denseblock4._forward_hooks


def test_default_class_is_the_predicted_one(model):
    predictor = Predictor(model, ["CLL", "FL", "MCL"], EvalPipeline(image_size=64), torch.device("cpu"))
    image = synthetic_image("MCL", 2)
    assert GradCam(predictor).explain(image).class_index == int(predictor.probabilities([image])[0].argmax())
