"""Prediction speed: one-image latency (decode of a 1388x1040 TIF included) and batch throughput.

Baseline: the model in eager fp32, NCHW. Fast path: core.inference.predict.prepare_for_inference (on CUDA
channels_last, bf16 and torch.compile with CUDA graphs; on the CPU the same eager model, so the
ratio there is ~1 and the figure that matters is the absolute one-image time), as the Predict page
uses it. With --cpu-compile, the CPU fast path is the one CPU_COMPILE=1 gives the app: single
images through a torch.compile'd model (its compilation time is printed apart, not timed).

    python -m bench.predict                 # auto device
    python -m bench.predict --device cpu --batch 8 --repeat 3   # quick CPU smoke
    python -m bench.predict --device cpu --batch 16 --repeat 25 --cpu-compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from bench.common import report, timed_pair
from core.data.cache import to_tensor
from core.data.datasets import load_rgb
from core.training.model import PaperDenseNet
from core.inference.predict import prepare_for_inference
from core.training.loop import pick_device, predict_logits, preprocess
from core.transforms.pipelines import EvalPipeline


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="batch for the throughput figure")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cpu-compile", action="store_true", help="on the CPU, compile for single images (CPU_COMPILE=1)")
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
        started = time.perf_counter()
        fast = prepare_for_inference(same_weights, device, size, cpu_compile=args.cpu_compile)
        print(f"fast path ready in {time.perf_counter() - started:.1f} s (compilation and warm-up)", flush=True)

        @torch.no_grad()
        def plain_logits(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([plain(preprocess(x[i : i + 64], device)).cpu() for i in range(0, len(x), 64)])

        pipeline = EvalPipeline(image_size=size)  # the predictor's way from an image to model input

        def decoded() -> torch.Tensor:
            return to_tensor(pipeline([load_rgb(tif)])[0])

        one = decoded()
        with torch.no_grad():
            differs = (plain_logits(one) - predict_logits(fast, one, device)).abs().max().item()
        print(f"largest logit difference, fast path vs baseline, one image: {differs:.2g}", flush=True)
        batch = torch.randint(0, 255, (args.batch, 3, size, size), dtype=torch.uint8)

        one_base, one_fast = timed_pair(lambda: plain_logits(decoded()), lambda: predict_logits(fast, decoded(), device),
                                        device, repeat=args.repeat)
        batch_base, batch_fast = timed_pair(lambda: plain_logits(batch), lambda: predict_logits(fast, batch, device),
                                            device, warmup=1, repeat=3)
        rows = [
            ("one image, decode + predict", one_base * 1000, one_fast * 1000, "ms"),
            (f"batch of {args.batch}", args.batch / batch_base, args.batch / batch_fast, "img/s"),
        ]
    return report("Prediction", device, rows)


if __name__ == "__main__":
    main()
