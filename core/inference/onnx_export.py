"""A run's network as an ONNX model: what ONNX Runtime runs on the CPU (core/inference/engine.py)
and what leaves the app for use elsewhere (`python -m core export RUN --format onnx`).

The graph takes what the evaluation pipeline produces, uint8 RGB samples (N, 3, S, S), and returns
raw class probabilities (N, C). Inside it: the scaling to [0, 1] and the ImageNet normalisation of
core/training/loop.py::preprocess, the network, the softmax and, for a run with test-time
augmentation, the mean over the four flips of loop.py::predict_proba. Outside it stay the steps that
work on a whole image: the resize or the tiles, stain normalisation, the mean over an image's tiles,
and temperature scaling (which applies to an image's probabilities, after that mean). What those
need is in the model's metadata_props (`metadata`), as JSON strings.

The graph is written out here from the network's own layers rather than by torch.onnx.export: the
dynamo exporter spends 30-100 s on DenseNet-201's ~700 layers on two cores whatever the image size
(tracing, not arithmetic), which every run would pay at its first prediction on a CPU; writing the
layers out takes about a second. The builder walks the modules of the paper's network
(core/training/model.py), reads each layer's settings from it, and refuses a layer it has no form
for and a weight it did not place; tests/test_onnx.py checks its graph against torch.

The exported file of a run is cached beside its model file (runs/<id>/model.onnx), keyed by the
model file's sha256 in its metadata, so a replaced model file is exported anew. It counts towards
MAX_DISK_GB like every file under APP_HOME.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors import SafetensorError, safe_open
from torch import nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from core.access.limits import check_disk
from core.config import Settings
from core.errors import UserError
from core.evaluation import calibration
from core.inference import model_file as model_files
from core.store.files import atomic_path, copy_file_atomic
from core.store.records import CalibrationRecord
from core.store.runs import MODEL_META_KEY, run_dir
from core.training.loop import MEAN, STD
from core.training.model import PaperDenseNet
from core.transforms.pipelines import EvalPipeline

log = logging.getLogger(__name__)

# Of the exported file: its graph's input and output and its metadata keys. 2: the refer band with a
# guarantee (refer_confidence); an export of format 1 is made again.
FORMAT = 2
OPSET = 17
IR_VERSION = 8  # the oldest that opset 17 allows, so that older ONNX Runtimes read the file too
ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "images", "probabilities"


def read_description(path: Path) -> dict[str, Any]:
    """The model file's description (its header's JSON) without reading its weights."""
    try:
        with safe_open(str(path), framework="np") as f:
            header = (f.metadata() or {}).get(MODEL_META_KEY)
        meta = None if header is None else json.loads(header)
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{Path(path).name} is damaged or not a model file ({exc}).") from None
    if meta is None or meta.get("format") != model_files.FORMAT:
        raise UserError(f"{Path(path).name} is not a model file of this version.")
    return meta


# ---------------------------------------------------------------------------------------------
# The graph


class _Graph:
    """Nodes and initializers of one graph; a weight is named by its state-dict key."""

    def __init__(self, state: dict[str, Any]):
        self.state, self.used = state, set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str) -> str:
        if name not in self.state:
            raise ValueError(f"the network has no weight {name!r}")
        if name not in self.used:
            self.used.add(name)
            self.initializers.append(numpy_helper.from_array(self.state[name].detach().cpu().numpy(), name))
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, tuple) else [int(v), int(v)]


def _conv(g: _Graph, m: nn.Conv2d, name: str, x: str) -> str:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ValueError(f"no ONNX form here for {name}'s padding ({m.padding_mode}, {m.padding})")
    ph, pw = _pair(m.padding)
    inputs = [x, g.weight(f"{name}.weight")] + ([g.weight(f"{name}.bias")] if m.bias is not None else [])
    return g.op(
        "Conv",
        inputs,
        kernel_shape=_pair(m.kernel_size),
        strides=_pair(m.stride),
        pads=[ph, pw, ph, pw],
        dilations=_pair(m.dilation),
        group=m.groups,
    )


def _batch_norm(g: _Graph, m: nn.BatchNorm2d, name: str, x: str) -> str:
    if not (m.affine and m.track_running_stats):
        raise ValueError(f"no ONNX form here for {name}: batch norm without affine weights or running statistics")
    return g.op(
        "BatchNormalization",
        [x] + [g.weight(f"{name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")],
        epsilon=m.eps,
    )


def _pool(g: _Graph, m: nn.MaxPool2d | nn.AvgPool2d, name: str, x: str) -> str:
    ph, pw = _pair(m.padding)
    attrs = dict(
        kernel_shape=_pair(m.kernel_size), strides=_pair(m.stride), pads=[ph, pw, ph, pw], ceil_mode=int(m.ceil_mode)
    )
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != [1, 1] or m.return_indices:
            raise ValueError(f"no ONNX form here for {name} (dilated, or returning indices)")
        return g.op("MaxPool", [x], **attrs)
    if m.divisor_override is not None:
        raise ValueError(f"no ONNX form here for {name} (divisor_override)")
    return g.op("AveragePool", [x], count_include_pad=int(m.count_include_pad), **attrs)


def _layer(g: _Graph, m: nn.Module, name: str, x: str) -> str:
    """The ONNX nodes of one module in evaluation mode, applied to `x`; its output's name."""
    if isinstance(m, _DenseBlock):  # each layer sees every earlier output, concatenated
        features = [x]
        for child, layer in m.items():
            joined = g.op("Concat", features, axis=1) if len(features) > 1 else x
            features.append(_layer(g, layer, f"{name}.{child}", joined))
        return g.op("Concat", features, axis=1)
    if isinstance(m, (nn.Sequential, _DenseLayer)):  # a dense layer: its children in order (dropout aside)
        for child, sub in m.named_children():
            x = _layer(g, sub, f"{name}.{child}", x)
        return x
    if isinstance(m, nn.Conv2d):
        return _conv(g, m, name, x)
    if isinstance(m, nn.BatchNorm2d):
        return _batch_norm(g, m, name, x)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(g, m, name, x)
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x])
    if isinstance(m, nn.Linear):
        inputs = [x, g.weight(f"{name}.weight")] + ([g.weight(f"{name}.bias")] if m.bias is not None else [])
        return g.op("Gemm", inputs, transB=1)
    if isinstance(m, nn.Dropout):  # the identity at evaluation
        return x
    raise ValueError(f"no ONNX form here for layer {name} ({type(m).__name__})")


def _flip(g: _Graph, x: str, axis: str) -> str:
    # Slice from the last element back past the first (ends: INT64_MIN), step -1: the axis reversed.
    return g.op("Slice", [x, "minus_one", "before_first", axis, "minus_one"])


def build_graph(model: PaperDenseNet, image_size: int, tta: bool) -> onnx.ModelProto:
    """uint8 (N, 3, S, S) samples -> float32 (N, C) probabilities, as Predictor.score gives them per
    sample (see the module docstring for what is inside)."""
    if type(model) is not PaperDenseNet:
        raise ValueError(f"the ONNX graph is written for PaperDenseNet, not {type(model).__name__}")
    state = model.state_dict()
    g = _Graph(state)
    x = g.op("Cast", [INPUT], to=TensorProto.FLOAT)
    x = g.op("Div", [x, g.constant("pixel_scale", np.array(255, dtype=np.float32))])
    x = g.op("Sub", [x, g.constant("pixel_mean", MEAN.numpy().astype(np.float32))])
    x = g.op("Div", [x, g.constant("pixel_std", STD.numpy().astype(np.float32))])
    if tta:  # the 4 views of loop.tta_views, stacked along the batch: identity, left-right, top-bottom, both
        g.constant("minus_one", np.array([-1], dtype=np.int64))
        g.constant("before_first", np.array([np.iinfo(np.int64).min], dtype=np.int64))
        height, width = (
            g.constant(f"{n}_axis", np.array([i], dtype=np.int64)) for n, i in (("height", 2), ("width", 3))
        )
        top_bottom = _flip(g, x, height)
        x = g.op("Concat", [x, _flip(g, x, width), top_bottom, _flip(g, top_bottom, width)], axis=0)
    x = g.op("Relu", [_layer(g, model.features, "features", x)])  # PaperDenseNet.forward
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    x = g.op("Softmax", [_layer(g, model.head, "head", x)], axis=1)
    classes = model.head[-1].out_features
    if tta:  # (4N, C) -> (4, N, C) -> the mean over the views
        x = g.op("Reshape", [x, g.constant("view_shape", np.array([4, -1, classes], dtype=np.int64))])
        x = g.op("ReduceMean", [x], axes=[0], keepdims=0)
    g.nodes[-1].output[0] = OUTPUT
    unused = sorted(k for k in state if k not in g.used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"the ONNX graph leaves out weights of the network: {unused[:5]}")
    graph = helper.make_graph(
        g.nodes,
        "paper_densenet201",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        g.initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lymphoma-densenet (core/inference/onnx_export.py)",
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


# ---------------------------------------------------------------------------------------------
# The metadata


def metadata(meta: dict[str, Any], model_sha256: str) -> dict[str, str]:
    """The exported model's metadata_props: everything a user of the file needs around the graph."""
    prep, cal = EvalPipeline(**meta["preparation"]).to_dict(), CalibrationRecord.from_dict(meta.get("calibration"))
    band = calibration.recorded_band(cal)
    values = {
        "format_version": FORMAT,
        "classes": list(meta["classes"]),
        "input": f"{INPUT}: uint8 (N, 3, {prep['image_size']}, {prep['image_size']}) RGB samples, channels first, "
        "resized (or cut into tiles) and stain-normalised as `preparation` says",
        "output": f"{OUTPUT}: float32 (N, C) raw class probabilities in the order of `classes`, one row per "
        "sample, before temperature scaling; a tiled image's probabilities are the mean of its tiles' rows",
        "image_size": prep["image_size"],
        "normalisation": {
            "scale": 1 / 255,
            "mean": MEAN.flatten().tolist(),
            "std": STD.flatten().tolist(),
            "where": "inside the graph: (x / 255 - mean) / std per channel",
        },
        "test_time_augmentation": "inside the graph: the mean over 4 flips" if prep.get("tta") else "none",
        "preparation": prep,
        "temperature": cal.temperature,
        # The band as the app applies it (recorded_band), with the confidence its claim holds at.
        "refer_threshold": None if band is None else band.threshold,
        "refer_target": cal.refer_target,
        "refer_confidence": None if band is None else band.confidence,
        "run_id": meta.get("run_id"),
        "model_sha256": model_sha256,
        "weights_sha256": meta.get("weights_sha256"),
    }
    return {k: json.dumps(v) for k, v in values.items()}


def read_metadata(path: Path) -> dict[str, Any] | None:
    """An exported model's metadata, decoded; None for a file that is not one of this format."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is simply not a current export
        log.info("%s is not a readable ONNX export (%s: %s)", path, type(exc).__name__, exc)
        return None
    return props if props.get("format_version") == FORMAT else None


def write_onnx(model_path: Path, target: Path, model_sha256: str) -> None:
    """Export the model file at `model_path` to `target` (atomically), with its metadata."""
    state, meta = model_files.read_model(model_path)
    model = PaperDenseNet(len(meta["classes"]))
    model.load_state_dict(state)
    prep = meta["preparation"]
    proto = build_graph(model.eval(), int(prep["image_size"]), bool(prep.get("tta")))
    helper.set_model_props(proto, metadata(meta, model_sha256))
    with atomic_path(target) as tmp:
        onnx.save_model(proto, str(tmp))


# ---------------------------------------------------------------------------------------------
# A run's export


def cached_export(settings: Settings, run_id: int, model_path: Path, model_sha256: str) -> Path:
    """runs/<id>/model.onnx, exported now unless the one there is of this model file."""
    target = run_dir(settings, run_id) / ONNX_FILE
    if target.exists():
        props = read_metadata(target)
        if props is not None and props.get("model_sha256") == model_sha256:
            return target
    check_disk(settings, model_path.stat().st_size, f"the ONNX copy of run {run_id}'s model")
    write_onnx(model_path, target, model_sha256)
    return target


def export_run(session, settings: Settings, run_id: int, out_dir: Path | None = None) -> Path:
    """The ONNX file of a succeeded run's model: the cached one beside the model file, or with
    `out_dir` a copy named run-<id>.onnx there. UserError for a run without a usable model."""
    from core.inference.predict import check_model_owner, model_sha256, usable_model_file

    run, path = usable_model_file(session, settings, run_id)
    check_model_owner(read_description(path), run)
    cached = cached_export(settings, run_id, path, model_sha256(settings, run_id))
    if out_dir is None:
        return cached
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder to export into.")
    out = out_dir / f"run-{run_id}.onnx"
    copy_file_atomic(cached, out)
    return out
