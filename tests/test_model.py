import urllib.error

import pytest
import torch
import torchvision
from torchvision.models import densenet201

from core.errors import UserError
from core.training.model import PaperDenseNet, build_model


def test_shape_head_and_nothing_frozen():
    model = PaperDenseNet(num_classes=3)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3)
    head = list(model.head)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].p, head[3].out_features) == (1920, 512, 0.5, 3)
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    # DenseNet-201 features (18.1M) + 1920*512+512 + 512*3+3
    assert (
        sum(p.numel() for p in params)
        == sum(p.numel() for p in densenet201().features.parameters()) + 1920 * 512 + 512 + 512 * 3 + 3
    )


def test_missing_imagenet_weights_names_both_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as info:
        build_model(3, "imagenet")
    message = str(info.value)
    assert "--weights PATH" in message and "--weights none" in message and "name resolution" in message


def test_weights_from_a_local_torchvision_file(tmp_path):
    reference = densenet201()
    path = tmp_path / "densenet201.pth"
    torch.save(reference.state_dict(), path)
    model, used = build_model(3, str(path))
    assert used.startswith("file ")
    assert torch.equal(model.features.conv0.weight, reference.features.conv0.weight)


def test_none_weights_are_reported_as_random():
    _, used = build_model(3, "none")
    assert "random" in used


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_weights_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError):
        build_model(3, str(path))
