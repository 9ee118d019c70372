"""Settings, read once from environment variables. The only place that looks at os.environ.

APP_HOME      folder for images, checkpoints and the default database (default ./var)
DATABASE_URL  SQLAlchemy URL (default: SQLite file APP_HOME/app.db, WAL mode)
MAX_IMAGE_PIXELS  largest image accepted at ingest; larger is treated as a decompression bomb
MIN_IMAGE_SIDE    smallest width/height accepted at ingest
DEFAULT_WEIGHTS   backbone weights when a run names none: "imagenet" (the paper's), "none",
                  or a path to a local weights file (for sites without internet)
IMPORT_ROOTS      server folders (os.pathsep-separated) that the web app may import datasets from
START_WORKER      1 (default): the web app starts a worker when none is alive; 0 when workers run elsewhere
WORKER_SLOTS      runs one worker trains at once (default 1: one per GPU, one on CPU)
HEARTBEAT_SECONDS how often a running job and a worker write their heartbeat
STALE_SECONDS     a heartbeat older than this means the process is gone
MAX_UPLOAD_MB     largest web upload (a zip, or loose files together) in MB (default 2048); the Streamlit
                  server's own server.maxUploadSize (.streamlit/config.toml, also 2048) stays the outer
                  bound per file, so set this at or below it
MAX_IMAGES_PER_DATASET  most images one dataset may hold (default 20000)
MAX_QUEUED_RUNS   most runs waiting in the queue at once, for everyone together (default 20)
MAX_QUEUED_RUNS_PER_USER  most runs one person may have waiting in the queue (default 10: two 5-fold
                  experiments); runs recorded without a user (library calls) are not counted per person
MAX_DISK_GB       most space that files under APP_HOME (images, runs, database, and uploads being unpacked
                  under APP_HOME/tmp) may use before ingest, uploads and new runs are refused (default 0: no limit)
MAX_UNPACKED_MB   most a zip may unpack to, all its files together, in MB (default 20480); checked from the
                  zip's directory before anything is unpacked, and again on the bytes actually written
MAX_ZIP_ENTRIES   most files and folders one zip may hold (default MAX_IMAGES_PER_DATASET + 1000, for the class
                  folders and stray files beside the images)
For the seven limits above, 0 means no limit.
MAX_SESSION_UPLOAD_MB  most that one browser session's uploads may hold in server memory at once, in MB
                  (default MAX_UPLOAD_MB; 0: no limit); serve.py answers an upload past it with 413, before
                  reading it, and takes uploads only from signed-in sessions
MAX_USER_UPLOAD_MB  most that one person's uploads may hold in server memory at once, all their browser sessions
                  together (those closed too, until the server lets go of their files), in MB (default
                  MAX_SESSION_UPLOAD_MB; 0: no limit); serve.py answers an upload past it with 413
MAX_PREDICT_PIXELS  most pixels one prediction (an API request, a batch on the Predict page, a `predict` command)
                  may decode, its images together, counted from their headers before any is decoded (default
                  2,000,000,000: some 1,400 images of the paper's 1388x1040, or 20 at MAX_IMAGE_PIXELS; 0: no
                  limit). Images are decoded one at a time, each reduced toward the model's input size, so this
                  bounds the time a prediction takes, not its memory (core/inference/admission.py)
MAX_USER_PREDICT_PIXELS  most pixels one person's predictions under way or waiting may decode together (default
                  twice MAX_PREDICT_PIXELS; 0: no limit); one past it is refused (API 429) until theirs finish
MAX_CONCURRENT_PREDICTIONS  predictions one server process decodes and classifies at once (default 2; 0: no
                  limit); each holds at most one decoded image at full size (up to 4 bytes a pixel of
                  MAX_IMAGE_PIXELS) besides the model
PREDICT_WAIT_SECONDS  how long a prediction waits for its turn before it is refused (API 503; default 10)
AUTH_MODE         who may use the web app (core/access/accounts.py): "none" (default: no sign-in, everyone is the
                  local editor "local"; for one person on their own machine), "password" (accounts in
                  AUTH_FILE) or "oidc" (Streamlit's st.login, [auth] in .streamlit/secrets.toml)
AUTH_FILE         the accounts file (TOML; default APP_HOME/accounts.toml), written by
                  `python -m core.access.accounts add NAME --role editor`
INFERENCE_ENGINE  what runs a trained model for prediction (core/inference/engine.py): "auto" (default: ONNX
                  Runtime on the CPU, torch on CUDA), "torch" or "onnxruntime"
KEEP_CHECKPOINTS  1: a succeeded run keeps its resumable checkpoint (last.pt: weights, optimiser state, random
                  streams; about three times the model file's size). Default 0: deleted once the run's model
                  file (model.safetensors, weights and everything prediction needs) is written; failed and
                  cancelled runs always keep theirs, to be resumed
OIDC_ROLES        roles of addresses signed in with OIDC, e.g. "ana@lab.org=editor,*=viewer", added to
                  the [oidc_roles] table of AUTH_FILE (this wins); an address with no role is refused
PREDICTION_LOG_DAYS  days the log of predictions (who classified which image with which model, and the
                  answer) keeps a row (default 365; 0: for ever)
SIGN_IN_HOURS     how long a password sign-in lasts in a browser, across reloads and new tabs (default 12; 0: only
                  as long as the tab), core/access/remembered.py; signing out or removing the account ends it
PREDICTION_LOG_IMAGES  1: the log also keeps each classified image's bytes, under APP_HOME/prediction_images
                  by content hash, counted against MAX_DISK_GB. Default 0: only the image's sha256, name and size
REVIEWS           1 (default): logged predictions can be reviewed (the Review page), and the images the model
                  referred are kept by content hash for that (counted against MAX_DISK_GB) even when
                  PREDICTION_LOG_IMAGES is 0. 0: no review queue, and no image kept for it
ALLOWED_HOSTS     the host names the server answers to, comma-separated (default: localhost, 127.0.0.1, [::1], on any
                  port). serve.py refuses a request (pages, websocket and API) whose Host header names another (400),
                  so a web page whose own name was pointed at this machine (DNS rebinding) cannot talk to the server.
                  An entry is a name or address (any port), NAME:PORT (that port only), *.example.org (its subdomains)
                  or * (any: only behind a proxy that checks the name itself). Behind a reverse proxy, name the
                  public host (e.g. lymphoma.example.org) and have the proxy pass the browser's Host header on
ALLOWED_ORIGINS   web origins besides the app's own whose pages may send requests to the API, comma-separated, such
                  as https://lymphoma.example.org (default none). The API refuses (403) a request whose Origin
                  header (every browser's POST has one) is neither the app's own (the scheme, host and port the
                  request came in by) nor listed here. Behind a proxy that ends TLS without passing the scheme on,
                  list the public https origin. The API sends no CORS headers: other origins' pages still cannot
                  read its answers
SLIDE_MPP         microns per pixel of the tiles cut from whole-slide images (core/slides/; default 0.5, a 20x
                  objective's scale); tiles are cut by physical scale, whatever the scanner's pyramid levels
SLIDE_TILE_PX     side of a slide's tiles in pixels at SLIDE_MPP (default 224)
SLIDE_MAX_TILES   most tiles used per slide, sampled at random over its tissue (default 256; 0: every tissue tile)
TISSUE_MIN_SATURATION  HSV saturation (0-1) below which a slide's pixel counts as glass, not tissue (default 0.05)
TISSUE_MAX_PALE_FRACTION  a slide tile with more than this share of such pale pixels is dropped (default 0.6)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    app_home: Path
    database_url: str
    max_image_pixels: int
    min_image_side: int
    default_weights: str
    import_roots: tuple[Path, ...]
    start_worker: bool
    worker_slots: int
    heartbeat_seconds: float
    stale_seconds: float
    max_upload_mb: float = 2048
    max_images_per_dataset: int = 20_000
    max_queued_runs: int = 20
    max_disk_gb: float = 0
    max_queued_runs_per_user: int = 10
    max_unpacked_mb: float = 20_480
    max_zip_entries: int = 21_000
    max_session_upload_mb: float = 2048
    auth_mode: str = "none"
    auth_file: Path | None = None  # None: APP_HOME/accounts.toml
    oidc_roles: str = ""
    keep_checkpoints: bool = False
    inference_engine: str = "auto"
    prediction_log_days: int = 365
    prediction_log_images: bool = False
    reviews: bool = True
    sign_in_hours: float = 12
    max_user_upload_mb: float = 2048
    max_predict_pixels: int = 2_000_000_000
    max_user_predict_pixels: int = 4_000_000_000
    max_concurrent_predictions: int = 2
    predict_wait_seconds: float = 10
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
    allowed_origins: tuple[str, ...] = ()
    slide_mpp: float = 0.5
    slide_tile_px: int = 224
    slide_max_tiles: int = 256
    tissue_min_saturation: float = 0.05
    tissue_max_pale_fraction: float = 0.6

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


def _items(text: str) -> tuple[str, ...]:
    """A comma-separated setting's entries, trimmed and lower-cased (host names and origins ignore case)."""
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


def _default_zip_entries(env: dict[str, str]) -> int:
    # A full dataset in one zip fits; 100,000 one-byte entries (minutes of unpacking) do not.
    images = int(env.get("MAX_IMAGES_PER_DATASET", 20_000))
    return images + 1000 if images > 0 else 0


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    app_home = Path(env.get("APP_HOME", "var")).expanduser().resolve()
    default_url = f"sqlite:///{app_home / 'app.db'}"
    return Settings(
        app_home=app_home,
        database_url=env.get("DATABASE_URL", default_url),
        # 1388x1040 is the paper's size; 100 MP leaves room for whole-slide crops,
        # and stops a 50,000 x 50,000 "image" that would exhaust memory when decoded.
        max_image_pixels=int(env.get("MAX_IMAGE_PIXELS", 100_000_000)),
        # DenseNet-201 needs at least 32 px to reach its last block.
        min_image_side=int(env.get("MIN_IMAGE_SIDE", 32)),
        default_weights=env.get("DEFAULT_WEIGHTS", "imagenet"),
        import_roots=tuple(Path(p).expanduser().resolve() for p in env.get("IMPORT_ROOTS", "").split(os.pathsep) if p),
        start_worker=env.get("START_WORKER", "1") not in ("0", "false", "no"),
        worker_slots=int(env.get("WORKER_SLOTS", 1)),
        heartbeat_seconds=float(env.get("HEARTBEAT_SECONDS", 2)),
        # Several missed heartbeats, so a busy machine is not mistaken for a dead worker.
        stale_seconds=float(env.get("STALE_SECONDS", 30)),
        max_upload_mb=float(env.get("MAX_UPLOAD_MB", 2048)),
        max_images_per_dataset=int(env.get("MAX_IMAGES_PER_DATASET", 20_000)),
        max_queued_runs=int(env.get("MAX_QUEUED_RUNS", 20)),
        max_disk_gb=float(env.get("MAX_DISK_GB", 0)),
        max_queued_runs_per_user=int(env.get("MAX_QUEUED_RUNS_PER_USER", 10)),
        max_unpacked_mb=float(env.get("MAX_UNPACKED_MB", 20_480)),
        max_zip_entries=int(env.get("MAX_ZIP_ENTRIES", _default_zip_entries(env))),
        max_session_upload_mb=float(env.get("MAX_SESSION_UPLOAD_MB", env.get("MAX_UPLOAD_MB", 2048))),
        # Not validated here: an unknown mode must refuse every visitor (the sign-in gate says
        # why), never fall back to "none", which lets everyone in.
        auth_mode=env.get("AUTH_MODE", "none").strip().lower() or "none",
        auth_file=Path(env["AUTH_FILE"]).expanduser().resolve() if env.get("AUTH_FILE") else None,
        oidc_roles=env.get("OIDC_ROLES", ""),
        keep_checkpoints=env.get("KEEP_CHECKPOINTS", "0") in ("1", "true", "yes"),
        # Checked where a model is loaded (core/inference/engine.py), which names the choices.
        inference_engine=env.get("INFERENCE_ENGINE", "auto").strip().lower() or "auto",
        prediction_log_days=int(env.get("PREDICTION_LOG_DAYS", 365)),
        prediction_log_images=env.get("PREDICTION_LOG_IMAGES", "0") in ("1", "true", "yes"),
        reviews=env.get("REVIEWS", "1") in ("1", "true", "yes"),
        sign_in_hours=float(env.get("SIGN_IN_HOURS", 12)),
        max_user_upload_mb=float(
            env.get("MAX_USER_UPLOAD_MB", env.get("MAX_SESSION_UPLOAD_MB", env.get("MAX_UPLOAD_MB", 2048)))
        ),
        max_predict_pixels=int(env.get("MAX_PREDICT_PIXELS", 2_000_000_000)),
        max_user_predict_pixels=int(
            env.get("MAX_USER_PREDICT_PIXELS", 2 * int(env.get("MAX_PREDICT_PIXELS", 2_000_000_000)))
        ),
        max_concurrent_predictions=int(env.get("MAX_CONCURRENT_PREDICTIONS", 2)),
        predict_wait_seconds=float(env.get("PREDICT_WAIT_SECONDS", 10)),
        allowed_hosts=_items(env.get("ALLOWED_HOSTS") or "localhost,127.0.0.1,[::1]"),  # empty: the default
        allowed_origins=_items(env.get("ALLOWED_ORIGINS", "")),
        # Checked where slides are tiled (core/slides/tiling.py), which names the bounds.
        slide_mpp=float(env.get("SLIDE_MPP", 0.5)),
        slide_tile_px=int(env.get("SLIDE_TILE_PX", 224)),
        slide_max_tiles=int(env.get("SLIDE_MAX_TILES", 256)),
        tissue_min_saturation=float(env.get("TISSUE_MIN_SATURATION", 0.05)),
        tissue_max_pale_fraction=float(env.get("TISSUE_MAX_PALE_FRACTION", 0.6)),
    )
