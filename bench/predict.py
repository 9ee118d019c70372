"""Prediction speed: one-image latency (decode of a 1388x1040 TIF included) and batch throughput.

Baseline: the model in eager fp32, NCHW. Fast path: core.predict.prepare_for_inference (on CUDA
channels_last, bf16 and torch.compile with CUDA graphs; on the CPU the same eager model, so the
ratio there is ~1 and the figure that matters is the absolute one-image time), as the Predict page
uses it.

    python -m bench.predict                 # auto device
    python -m bench.predict --device cpu --batch 8 --repeat 3   # quick CPU smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from bench.common import report, timed
from core.data import resize, to_tensor
from core.datasets import load_rgb
from core.model import PaperDenseNet
from core.predict import prepare_for_inference
from core.train import pick_device, predict_logits, preprocess


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="batch for the throughput figure")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    size = args.image_size

    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "slide.tif"  # the paper's image size and format
        rng = np.random.default_rng(0)
        PILImage.fromarray(rng.integers(0, 255, (1040, 1388, 3), dtype=np.uint8)).save(tif)

        torch.manual_seed(0)
        plain = PaperDenseNet(3).to(device).eval()
        same_weights = PaperDenseNet(3)
        same_weights.load_state_dict(plain.state_dict())
        fast = prepare_for_inference(same_weights, device, size)

        @torch.no_grad()
        def plain_logits(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([plain(preprocess(x[i : i + 64], device)).cpu() for i in range(0, len(x), 64)])

        def decoded() -> torch.Tensor:
            return to_tensor([np.asarray(resize(load_rgb(tif), size), dtype=np.uint8)])

        batch = torch.randint(0, 255, (args.batch, 3, size, size), dtype=torch.uint8)

        rows = [
            ("one image, decode + predict", timed(lambda: plain_logits(decoded()), device, repeat=args.repeat) * 1000,
             timed(lambda: predict_logits(fast, decoded(), device), device, repeat=args.repeat) * 1000, "ms"),
            (f"batch of {args.batch}", args.batch / timed(lambda: plain_logits(batch), device, warmup=1, repeat=3),
             args.batch / timed(lambda: predict_logits(fast, batch, device), device, warmup=1, repeat=3), "img/s"),
        ]
    return report("Prediction", device, rows)


if __name__ == "__main__":
    main()
