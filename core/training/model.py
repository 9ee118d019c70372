"""The paper's model: DenseNet-201 features, then FC 512, ReLU, dropout 0.5, FC num_classes.

No layer is frozen. Backbone weights come from one of:
  "imagenet"  torchvision's weights API (downloads once, cached under TORCH_HOME)
  a path      a local .pth/.pt/.safetensors file (offline sites): a torchvision DenseNet-201
              state dict, or a checkpoint of this project's model
  "none"      random initialisation, reported as such
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models import DenseNet201_Weights, densenet201

from core.errors import UserError
from core.paper import PAPER

WEIGHT_CHOICES = ("imagenet", "none", "PATH to a weights file")

# The same failure in each front end's words: the command line names its flags, the pages the
# Train page's options (pages/train.py WEIGHT_LABELS). UserError carries both.
_MISSING_IMAGENET = (
    "ImageNet weights for DenseNet-201 could not be loaded ({reason}). "
    "This machine may be offline. Either use a local weights file (--weights PATH, or DEFAULT_WEIGHTS=PATH "
    "for every run), e.g. densenet201-c1103571.pth downloaded on a machine with internet, or train from "
    "random initialisation (--weights none)."
)
_MISSING_IMAGENET_PAGE = (
    "The ImageNet starting weights could not be loaded: this server is probably offline. On the Train page, "
    "under Backbone weights, choose 'None: random initialisation' to train from a random start, or ask the "
    "administrator to place the weights file (densenet201-c1103571.pth, downloaded on a machine with "
    "internet) on the server and choose 'A weights file on the server'."
)
_MISSING_IMAGENET_API = (
    'The ImageNet starting weights could not be loaded: this server is probably offline. Send "weights": '
    '"none" to train from a random start, or "weights": "/path/on/the/server/densenet201-c1103571.pth" '
    "for a weights file an administrator placed on the server."
)


class PaperDenseNet(nn.Module):
    def __init__(self, num_classes: int, hidden: int = PAPER.hidden, dropout: float = PAPER.dropout):
        super().__init__()
        self.features = densenet201(weights=None).features  # (B, 1920, H/32, W/32)
        self.head = nn.Sequential(
            nn.Linear(1920, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.features(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, 1920)
        return self.head(x)


def _torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The original DenseNet files name layers "norm.1"; torchvision's loader renames them to
    # "norm1". Same pattern as torchvision.models.densenet._load_state_dict.
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist. Choose one of: {', '.join(WEIGHT_CHOICES)}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged or truncated file is the user's to replace
            raise UserError(f"Cannot read weights file {path}: {exc}") from exc
    try:
        # weights_only refuses pickles that would run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"Cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a checkpoint of this project
    if not isinstance(state, dict):
        raise UserError(f"Weights file {path} does not hold a state dict.")
    return state


def load_backbone(model: PaperDenseNet, weights: str) -> str:
    """Load backbone weights into `model`; return a description of what was used (stored on the run)."""
    if weights == "none":
        return "none (random initialisation)"
    if weights == "imagenet":
        try:
            state = DenseNet201_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - URLError, OSError, HTTP errors all mean "not available"
            raise UserError(
                _MISSING_IMAGENET.format(reason=f"{type(exc).__name__}: {exc}"),
                page=_MISSING_IMAGENET_PAGE,
                api=_MISSING_IMAGENET_API,
            ) from exc
        source = "imagenet (torchvision DenseNet201_Weights.IMAGENET1K_V1)"
    else:
        path = Path(weights).expanduser()
        state = _load_file(path)
        source = f"file {path.resolve()}"
    state = _torchvision_keys(state)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise UserError(f"No DenseNet-201 'features.*' weights found in {weights}.")
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as exc:
        raise UserError(f"Weights in {weights} do not fit DenseNet-201: {str(exc)[:300]}") from exc
    return source


def check_weights(weights: str) -> None:
    """Raise UserError now, before anything is recorded, if `weights` cannot be loaded."""
    try:
        load_backbone(PaperDenseNet(2), weights)
    except UserError as exc:
        raise UserError(
            f"{exc} No run was queued.",
            page=f"{exc.for_page()} No run was queued.",
            api=f"{exc.for_api()} No run was queued.",
        ) from exc


def build_model(num_classes: int, weights: str = "none") -> tuple[PaperDenseNet, str]:
    """The paper's model with backbone weights loaded; returns (model, weights description)."""
    model = PaperDenseNet(num_classes)
    return model, load_backbone(model, weights)
