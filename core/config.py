"""Settings, read once from environment variables. The only place that looks at os.environ.

Each setting is declared once, as a field of `Settings`: its environment variable is the field's name
in capitals, and its metadata holds its kind (how the variable's text is read and written back), its
default (a value, or `derive`: a function of the settings declared before it) and its help. From that
one declaration come `load_settings`, the environment a child process is given (`child_env`, every
setting, so that a worker and its children see exactly what the process that started them saw), the
list below, and the README's table is checked against it (tests/test_config.py). An unset or empty
variable takes the default; a value that cannot be read is a UserError naming the variable.

The settings:
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError


@dataclass(frozen=True)
class Kind:
    """How one kind of setting is read from its variable's text and written back to it."""

    name: str  # in an error message: "a whole number", "1 or 0", ...
    read: Callable[[str], Any]  # raises ValueError on text it cannot read
    write: Callable[[Any], str]


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _read_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(text)


def _read_items(text: str) -> tuple[str, ...]:
    """A comma-separated setting's entries, trimmed and lower-cased (host names and origins ignore case)."""
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


def _read_path(text: str) -> Path:
    return Path(text).expanduser().resolve()


INT = Kind("a whole number", lambda t: int(t.strip()), str)
FLOAT = Kind("a number", lambda t: float(t.strip()), repr)
BOOL = Kind(f"one of {', '.join(_TRUE)} or {', '.join(_FALSE)}", _read_bool, lambda v: "1" if v else "0")
TEXT = Kind("text", str, str)
WORD = Kind("a word", lambda t: t.strip().lower(), str)  # a choice, checked where it is used
PATH = Kind("a path", _read_path, str)
OPTIONAL_PATH = Kind("a path", _read_path, lambda v: "" if v is None else str(v))
PATHS = Kind(
    f"paths separated by {os.pathsep}",
    lambda t: tuple(_read_path(p) for p in t.split(os.pathsep) if p),
    lambda v: os.pathsep.join(str(p) for p in v),
)
NAMES = Kind("names separated by commas", _read_items, ",".join)


def _setting(
    kind: Kind,
    default: Any = None,
    *,
    help: str,
    derive: Callable[[Mapping[str, Any]], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """A Settings field. `default`: the value when the variable is unset or empty; `derive`, instead,
    computes it from the settings declared before it. `shown`: the default as the docs write it
    (needed with `derive`; otherwise written from `default`)."""
    assert (derive is None) != (default is None) or kind is OPTIONAL_PATH, "a default or a derive, not both"
    assert derive is None or shown is not None, "a derived default says in words what it is"
    return dataclasses.field(
        metadata={"kind": kind, "default": default, "derive": derive, "help": help, "shown": shown}
    )


# The defaults that others derive from, named once.
_UPLOAD_MB = 2048
_IMAGES_PER_DATASET = 20_000
_PREDICT_PIXELS = 2_000_000_000


def _zip_entries(images: int) -> int:
    # A full dataset in one zip fits; 100,000 one-byte entries (minutes of unpacking) do not.
    return images + 1000 if images > 0 else 0


@dataclass(frozen=True)
class Settings:
    app_home: Path = _setting(
        PATH,
        derive=lambda v: _read_path("var"),
        shown="./var",
        help="folder for images, checkpoints and the default database",
    )
    database_url: str = _setting(
        TEXT,
        derive=lambda v: f"sqlite:///{v['app_home'] / 'app.db'}",
        shown="sqlite:///$APP_HOME/app.db",
        help="SQLAlchemy URL (default: SQLite file APP_HOME/app.db, WAL mode)",
    )
    # 1388x1040 is the paper's size; 100 MP leaves room for whole-slide crops, and stops a
    # 50,000 x 50,000 "image" that would exhaust memory when decoded.
    max_image_pixels: int = _setting(
        INT, 100_000_000, help="largest image accepted at ingest; larger is treated as a decompression bomb"
    )
    # DenseNet-201 needs at least 32 px to reach its last block.
    min_image_side: int = _setting(INT, 32, help="smallest width/height accepted at ingest")
    default_weights: str = _setting(
        TEXT,
        "imagenet",
        help='backbone weights when a run names none: "imagenet" (the paper\'s), "none", or a path to a local '
        "weights file (for sites without internet)",
    )
    import_roots: tuple[Path, ...] = _setting(
        PATHS, (), help="server folders (os.pathsep-separated) that the web app may import datasets from"
    )
    start_worker: bool = _setting(
        BOOL, True, help="1: the web app starts a worker when none is alive; 0 when workers run elsewhere"
    )
    worker_slots: int = _setting(INT, 1, help="runs one worker trains at once (1: one per GPU, one on CPU)")
    heartbeat_seconds: float = _setting(FLOAT, 2.0, help="how often a running job and a worker write their heartbeat")
    # Several missed heartbeats, so a busy machine is not mistaken for a dead worker.
    stale_seconds: float = _setting(FLOAT, 30.0, help="a heartbeat older than this means the process is gone")
    max_upload_mb: float = _setting(
        FLOAT,
        float(_UPLOAD_MB),
        help="largest web upload (a zip, or loose files together) in MB; the Streamlit server's own "
        "server.maxUploadSize (.streamlit/config.toml, also 2048) stays the outer bound per file, so set this "
        "at or below it (0: no limit)",
    )
    max_images_per_dataset: int = _setting(
        INT, _IMAGES_PER_DATASET, help="most images one dataset may hold (0: no limit)"
    )
    max_queued_runs: int = _setting(
        INT, 20, help="most runs waiting in the queue at once, for everyone together (0: no limit)"
    )
    max_disk_gb: float = _setting(
        FLOAT,
        0.0,
        help="most space that files under APP_HOME (images, runs, database, and uploads being unpacked under "
        "APP_HOME/tmp) may use before ingest, uploads and new runs are refused (0: no limit)",
    )
    max_queued_runs_per_user: int = _setting(
        INT,
        10,
        help="most runs one person may have waiting in the queue (10: two 5-fold experiments); runs recorded "
        "without a user (library calls) are not counted per person (0: no limit)",
    )
    max_unpacked_mb: float = _setting(
        FLOAT,
        20_480.0,
        help="most a zip may unpack to, all its files together, in MB; checked from the zip's directory before "
        "anything is unpacked, and again on the bytes actually written (0: no limit)",
    )
    max_zip_entries: int = _setting(
        INT,
        derive=lambda v: _zip_entries(v["max_images_per_dataset"]),
        shown=str(_zip_entries(_IMAGES_PER_DATASET)),
        help="most files and folders one zip may hold (default MAX_IMAGES_PER_DATASET + 1000, for the class "
        "folders and stray files beside the images; 0: no limit)",
    )
    max_session_upload_mb: float = _setting(
        FLOAT,
        derive=lambda v: v["max_upload_mb"],
        shown="MAX_UPLOAD_MB",
        help="most that one browser session's uploads may hold in server memory at once, in MB (default "
        "MAX_UPLOAD_MB; 0: no limit); serve.py answers an upload past it with 413, before reading it, and "
        "takes uploads only from signed-in sessions",
    )
    # Not validated here: an unknown mode must refuse every visitor (the sign-in gate says why),
    # never fall back to "none", which lets everyone in.
    auth_mode: str = _setting(
        WORD,
        "none",
        help='who may use the web app (core/access/accounts.py): "none" (no sign-in, everyone is the local '
        'editor "local"; for one person on their own machine), "password" (accounts in AUTH_FILE) or "oidc" '
        "(Streamlit's st.login, [auth] in .streamlit/secrets.toml)",
    )
    auth_file: Path | None = _setting(
        OPTIONAL_PATH,
        shown="$APP_HOME/accounts.toml",
        help="the accounts file (TOML; default APP_HOME/accounts.toml), written by "
        "`python -m core.access.accounts add NAME --role editor`",
    )
    oidc_roles: str = _setting(
        TEXT,
        "",
        help='roles of addresses signed in with OIDC, e.g. "ana@lab.org=editor,*=viewer", added to the '
        "[oidc_roles] table of AUTH_FILE (this wins); an address with no role is refused",
    )
    keep_checkpoints: bool = _setting(
        BOOL,
        False,
        help="1: a succeeded run keeps its resumable checkpoint (last.pt: weights, optimiser state, random "
        "streams; about three times the model file's size). 0: deleted once the run's model file "
        "(model.safetensors, weights and everything prediction needs) is written; failed and cancelled runs "
        "always keep theirs, to be resumed",
    )
    # Checked where a model is loaded (core/inference/engine.py), which names the choices.
    inference_engine: str = _setting(
        WORD,
        "auto",
        help='what runs a trained model for prediction (core/inference/engine.py): "auto" (ONNX Runtime on the '
        'CPU, torch on CUDA), "torch" or "onnxruntime"',
    )
    prediction_log_days: int = _setting(
        INT,
        365,
        help="days the log of predictions (who classified which image with which model, and the answer) keeps "
        "a row (0: for ever)",
    )
    prediction_log_images: bool = _setting(
        BOOL,
        False,
        help="1: the log also keeps each classified image's bytes, under APP_HOME/prediction_images by content "
        "hash, counted against MAX_DISK_GB. 0: only the image's sha256, name and size",
    )
    reviews: bool = _setting(
        BOOL,
        True,
        help="1: logged predictions can be reviewed (the Review page), and the images the model referred are "
        "kept by content hash for that (counted against MAX_DISK_GB) even when PREDICTION_LOG_IMAGES is 0. "
        "0: no review queue, and no image kept for it",
    )
    sign_in_hours: float = _setting(
        FLOAT,
        12.0,
        help="how long a password sign-in lasts in a browser, across reloads and new tabs (0: only as long as "
        "the tab), core/access/remembered.py; signing out or removing the account ends it",
    )
    max_user_upload_mb: float = _setting(
        FLOAT,
        derive=lambda v: v["max_session_upload_mb"],
        shown="MAX_SESSION_UPLOAD_MB",
        help="most that one person's uploads may hold in server memory at once, all their browser sessions "
        "together (those closed too, until the server lets go of their files), in MB (default "
        "MAX_SESSION_UPLOAD_MB; 0: no limit); serve.py answers an upload past it with 413",
    )
    max_predict_pixels: int = _setting(
        INT,
        _PREDICT_PIXELS,
        help="most pixels one prediction (an API request, a batch on the Predict page, a `predict` command) may "
        "decode, its images together, counted from their headers before any is decoded (2,000,000,000: some "
        "1,400 images of the paper's 1388x1040, or 20 at MAX_IMAGE_PIXELS; 0: no limit). Images are decoded one "
        "at a time, each reduced toward the model's input size, so this bounds the time a prediction takes, not "
        "its memory (core/inference/admission.py)",
    )
    max_user_predict_pixels: int = _setting(
        INT,
        derive=lambda v: 2 * v["max_predict_pixels"],
        shown="2 × MAX_PREDICT_PIXELS",
        help="most pixels one person's predictions under way or waiting may decode together (default twice "
        "MAX_PREDICT_PIXELS; 0: no limit); one past it is refused (API 429) until theirs finish",
    )
    max_concurrent_predictions: int = _setting(
        INT,
        2,
        help="predictions one server process decodes and classifies at once (0: no limit); each holds at most "
        "one decoded image at full size (up to 4 bytes a pixel of MAX_IMAGE_PIXELS) besides the model",
    )
    predict_wait_seconds: float = _setting(
        FLOAT, 10.0, help="how long a prediction waits for its turn before it is refused (API 503)"
    )
    allowed_hosts: tuple[str, ...] = _setting(
        NAMES,
        ("localhost", "127.0.0.1", "[::1]"),
        help="the host names the server answers to, comma-separated (any port). serve.py refuses a request "
        "(pages, websocket and API) whose Host header names another (400), so a web page whose own name was "
        "pointed at this machine (DNS rebinding) cannot talk to the server. An entry is a name or address (any "
        "port), NAME:PORT (that port only), *.example.org (its subdomains) or * (any: only behind a proxy that "
        "checks the name itself). Behind a reverse proxy, name the public host (e.g. lymphoma.example.org) and "
        "have the proxy pass the browser's Host header on",
    )
    allowed_origins: tuple[str, ...] = _setting(
        NAMES,
        (),
        help="web origins besides the app's own whose pages may send requests to the API, comma-separated, such "
        "as https://lymphoma.example.org. The API refuses (403) a request whose Origin header (every browser's "
        "POST has one) is neither the app's own (the scheme, host and port the request came in by) nor listed "
        "here. Behind a proxy that ends TLS without passing the scheme on, list the public https origin. The "
        "API sends no CORS headers: other origins' pages still cannot read its answers",
    )
    # Checked where slides are tiled (core/slides/tiling.py), which names the bounds.
    slide_mpp: float = _setting(
        FLOAT,
        0.5,
        help="microns per pixel of the tiles cut from whole-slide images (core/slides/; 0.5 is a 20x "
        "objective's scale); tiles are cut by physical scale, whatever the scanner's pyramid levels",
    )
    slide_tile_px: int = _setting(INT, 224, help="side of a slide's tiles in pixels at SLIDE_MPP")
    slide_max_tiles: int = _setting(
        INT, 256, help="most tiles used per slide, sampled at random over its tissue (0: every tissue tile)"
    )
    tissue_min_saturation: float = _setting(
        FLOAT, 0.05, help="HSV saturation (0-1) below which a slide's pixel counts as glass, not tissue"
    )
    tissue_max_pale_fraction: float = _setting(
        FLOAT, 0.6, help="a slide tile with more than this share of such pale pixels is dropped"
    )

    @property
    def images_dir(self) -> Path:
        return self.app_home / "images"

    @property
    def runs_dir(self) -> Path:
        return self.app_home / "runs"

    @property
    def tmp_dir(self) -> Path:
        return self.app_home / "tmp"

    @property
    def slide_jobs_dir(self) -> Path:
        return self.app_home / "slide_jobs"

    @property
    def slide_uploads_dir(self) -> Path:
        return self.app_home / "slide_uploads"

    @property
    def prediction_images_dir(self) -> Path:
        return self.app_home / "prediction_images"

    @property
    def accounts_file(self) -> Path:
        return self.auth_file or self.app_home / "accounts.toml"


@dataclass(frozen=True)
class Declared:
    """One setting as declared: its field, variable, kind, default (or how it is derived) and help."""

    field: str
    variable: str
    kind: Kind
    default: Any
    derive: Callable[[Mapping[str, Any]], Any] | None
    help: str
    shown: str  # the default as the docs write it


def _shown(kind: Kind, default: Any) -> str:
    if kind is BOOL:
        return kind.write(default)
    if isinstance(default, float):
        return f"{default:g}"
    return kind.write(default) or "(none)"


def declared() -> tuple[Declared, ...]:
    """Every setting, in the order of the Settings fields (a derived default reads those before it)."""
    return tuple(
        Declared(
            f.name,
            f.name.upper(),
            f.metadata["kind"],
            f.metadata["default"],
            f.metadata["derive"],
            f.metadata["help"],
            f.metadata["shown"] or _shown(f.metadata["kind"], f.metadata["default"]),
        )
        for f in dataclasses.fields(Settings)
    )


def _read(setting: Declared, text: str) -> Any:
    try:
        return setting.kind.read(text)
    except ValueError:
        raise UserError(f"The setting {setting.variable} must be {setting.kind.name}, got {text!r}.") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for setting in declared():
        text = env.get(setting.variable, "")
        if text.strip():
            values[setting.field] = _read(setting, text)
        else:
            values[setting.field] = setting.derive(values) if setting.derive else setting.default
    return Settings(**values)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment variables that give a process we start these same `settings`: every one,
    written as load_settings reads it (`load_settings(child_env(s)) == s`)."""
    return {s.variable: s.kind.write(getattr(settings, s.field)) for s in declared()}


def settings_help() -> str:
    """Each setting's variable, default and help, one paragraph each (this module's docstring ends with it)."""
    return "\n".join(f"{s.variable} (default {s.shown}): {s.help}." for s in declared())


__doc__ += "\n" + settings_help() + "\n"
