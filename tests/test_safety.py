"""Files from users are data, never code."""

import pickle

import pytest
import torch

from core.errors import UserError
from core.training.model import build_model


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_pickle_with_code_in_it_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.conv0.weight": _Exploit()}, f)
    with pytest.raises(UserError, match="Cannot read weights file"):
        build_model(3, str(path))
    assert not marker.exists()


def test_a_torch_save_with_code_in_it_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": _Exploit()}}, path)
    with pytest.raises(UserError):
        build_model(3, str(path))
    assert not marker.exists()
