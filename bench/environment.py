"""What a set of benchmark figures was measured on: Python, torch and its CUDA, the GPU, and ONNX
Runtime with its execution providers (whether the CUDA one actually loads, not only whether it
was built in).

    python -m bench.environment --device cuda      # prints the record as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.strip() or "nvidia-smi printed nothing"


def _torch(device: str) -> dict[str, str]:
    import torch

    from bench.common import device_name
    from core.training.loop import pick_device

    record = {
        "torch": torch.__version__,
        "torch built with CUDA": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()),
        "CUDA available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record |= {
            "GPU": props.name,
            "GPU memory": f"{props.total_memory / 2**30:.0f} GiB",
            "GPU multiprocessors": str(props.multi_processor_count),
            "GPU driver": _driver(),
        }
    try:
        record["device"] = device_name(pick_device(device))
    except (RuntimeError, AssertionError) as exc:  # e.g. --device cuda where torch sees no GPU
        record["device"] = f"{device}: unusable here ({exc})"
    return record


def _cuda_provider(ort) -> str:
    """Being listed only says the provider was built in; a session says whether its CUDA libraries load."""
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [value[0]], [value[1]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any ONNX Runtime of the last years
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        return f"does not load: {type(exc).__name__}: {exc}"
    used = session.get_providers()
    return "loads" if "CUDAExecutionProvider" in used else f"does not load (the session runs on {', '.join(used)})"


def _onnxruntime() -> dict[str, str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"onnxruntime": f"not installed ({exc})"}
    from importlib.metadata import packages_distributions

    dists = ", ".join(packages_distributions().get("onnxruntime", [])) or "distribution unknown"
    providers = ort.get_available_providers()
    record = {"onnxruntime": f"{ort.__version__} ({dists})", "onnxruntime providers": ", ".join(providers)}
    if "CUDAExecutionProvider" in providers:
        record["onnxruntime CUDA provider"] = _cuda_provider(ort)
    return record


def describe(device: str) -> dict[str, str]:
    record = {"python": platform.python_version(), "platform": platform.platform(), "CPU cores": str(os.cpu_count())}
    return record | _torch(device) | _onnxruntime()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    text = json.dumps(describe(args.device), indent=1)
    print(text)
    return text


if __name__ == "__main__":
    main()
