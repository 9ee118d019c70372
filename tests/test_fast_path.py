"""The fast paths give the same answers as the plain ones, and caches never serve stale data."""

import numpy as np
import torch

from core.data.cache import resized_array
from core.inference.predict import compiled_or_eager, prepare_for_inference
from core.store.db import Image
from core.training.loop import predict_logits, preprocess
from core.training.model import PaperDenseNet
from tests.synthetic import synthetic_array, synthetic_image


def test_inference_model_matches_the_plain_model():
    torch.manual_seed(0)
    plain = PaperDenseNet(3).eval()
    copy = PaperDenseNet(3)
    copy.load_state_dict(plain.state_dict())
    fast = prepare_for_inference(copy, torch.device("cpu"), 32)
    x = torch.from_numpy(np.stack([synthetic_array("FL", i, (32, 32)) for i in range(4)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = plain(preprocess(x, torch.device("cpu")))
    got = predict_logits(fast, x, torch.device("cpu"))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_compiled_predictor_is_warmed_up_and_kept(monkeypatch, caplog):
    """The compile-and-warm-up path (taken on CUDA) keeps the compiled model when compiling works,
    here with torch.compile replaced by a recording wrapper so that it runs on the CPU."""
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.model(x)

    monkeypatch.setattr(torch, "compile", lambda model, mode: Compiled(model))
    model = PaperDenseNet(3).eval()
    got = compiled_or_eager(model, torch.device("cpu"), 32)
    assert isinstance(got, Compiled) and calls == [(1, 3, 32, 32)]  # one warm-up call, at the served size
    assert "torch.compile failed" not in caplog.text


def test_failed_compilation_says_so_and_predicts_eagerly(monkeypatch, caplog):
    def broken(model, mode):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = PaperDenseNet(3).eval()
    assert compiled_or_eager(model, torch.device("cpu"), 32) is model
    assert "torch.compile failed (RuntimeError: no compiler)" in caplog.text


def _stored(settings, name: str, label: str, index: int) -> Image:
    import hashlib

    path = settings.images_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_image(label, index).save(path)
    return Image(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), stored_path=str(path.relative_to(settings.app_home))
    )


def test_resize_cache_follows_content_and_size(settings):
    first = _stored(settings, "a.png", "CLL", 1)
    a32 = resized_array(settings, first, 32)
    assert a32.shape == (32, 32, 3)
    assert np.array_equal(resized_array(settings, first, 32), a32)  # served from the cache
    assert resized_array(settings, first, 48).shape == (48, 48, 3)  # new size, new entry

    # New bytes under the same file name: a new hash, so the old entry is never used.
    changed = _stored(settings, "a.png", "MCL", 2)
    assert changed.sha256 != first.sha256
    assert not np.array_equal(resized_array(settings, changed, 32), a32)


def test_damaged_cache_entry_is_rebuilt(settings):
    image = _stored(settings, "b.png", "FL", 3)
    good = resized_array(settings, image, 32)
    (entry,) = (settings.app_home / "cache").rglob("*.npy")
    entry.write_bytes(b"garbage")
    assert np.array_equal(resized_array(settings, image, 32), good)
