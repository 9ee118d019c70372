"""Prediction speed, eager torch (baseline) against ONNX Runtime (fast path, the CPU engine of
core/inference/engine.py): one-image latency, decode of a 1388x1040 TIF and the evaluation pipeline
included, and the throughput of a batch. Both predictors are built from one model file of an
untrained DenseNet-201 and give the same probabilities (the largest difference is printed); their
calls alternate, so that a shared machine's drift falls on both alike.

With --device cuda: eager torch on the GPU against ONNX Runtime's CUDA provider, skipped with a note
where this ONNX Runtime has none (the onnxruntime-gpu package brings it). The app's engine on CUDA
is compiled torch (INFERENCE_ENGINE=auto), not ONNX Runtime.

    python -m bench.predict --device cpu                        # the CPU figures of bench/RESULTS.md
    python -m bench.predict --device cpu --image-size 32 --batch 2 --repeat 1   # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from bench.common import device_name, report, timed_pair
from core.data.decoding import load_rgb
from core.inference.model_file import write_model
from core.inference.onnx_export import write_onnx
from core.inference.onnx_predict import OnnxPredictor
from core.inference.predict import Predictor
from core.training.loop import pick_device
from core.training.model import PaperDenseNet
from core.transforms.pipelines import EvalPipeline

CLASSES = ["CLL", "FL", "MCL"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="batch for the throughput figure")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    size = args.image_size

    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "slide.tif"  # the paper's image size and format
        rng = np.random.default_rng(0)
        PILImage.fromarray(rng.integers(0, 255, (1040, 1388, 3), dtype=np.uint8)).save(tif)

        torch.manual_seed(0)
        model = PaperDenseNet(len(CLASSES)).eval()
        model_file, onnx_file = Path(tmp) / "model.safetensors", Path(tmp) / "model.onnx"
        write_model(model_file, model.state_dict(), {"classes": CLASSES, "preparation": {"image_size": size}})
        started = time.perf_counter()
        write_onnx(model_file, onnx_file, "bench")
        print(f"ONNX export in {time.perf_counter() - started:.1f} s", flush=True)
        fast = OnnxPredictor.from_files(onnx_file, model_file, str(device))
        if device.type == "cuda" and "CUDAExecutionProvider" not in fast.providers:
            note = (
                f"## Prediction\ndevice: {device_name(device)}\n\nskipped: this ONNX Runtime has no CUDA "
                "provider (install onnxruntime-gpu); nothing was timed."
            )
            print(note, flush=True)
            return note
        # The baseline: the same weights, eager (no torch.compile, which Predictor.from_file uses on CUDA).
        eager = Predictor(model.to(device), CLASSES, EvalPipeline(image_size=size), device)

        def one(predictor) -> np.ndarray:
            return predictor.probabilities([load_rgb(tif)])

        differs = np.abs(one(eager) - one(fast)).max()
        print(f"largest probability difference, ONNX Runtime vs eager torch, one image: {differs:.2g}", flush=True)
        batch = torch.randint(0, 255, (args.batch, 3, size, size), dtype=torch.uint8)

        one_base, one_fast = timed_pair(lambda: one(eager), lambda: one(fast), device, repeat=args.repeat)
        batch_base, batch_fast = timed_pair(
            lambda: eager.score(batch), lambda: fast.score(batch), device, warmup=1, repeat=min(args.repeat, 3)
        )
        rows = [
            ("one image, decode + predict", one_base * 1000, one_fast * 1000, "ms"),
            (f"batch of {args.batch}", args.batch / batch_base, args.batch / batch_fast, "img/s"),
        ]
    return report(
        f"Prediction: eager torch (baseline) against ONNX Runtime, {', '.join(fast.providers)} (fast path)",
        device,
        rows,
    )


if __name__ == "__main__":
    main()
