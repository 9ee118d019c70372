"""The API's JSON bodies as pydantic models, from which FastAPI writes the OpenAPI document
(GET /api/v1/openapi.json, shown at /api/v1/docs). core/api/payloads.py makes the bodies from the views'
records; tests/test_api_schema.py holds the answers to these models. The request bodies an endpoint
reads itself, within its limits (core/api/bodies.py), are here too, for the document; the run settings'
models are made from RunConfig's fields in core/api/run_configs.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.api.run_configs import RunConfigModel
from core.jobs.views.slides import SlideVerdict
from core.store.db import RunStatus

Status = Literal[tuple(s.value for s in RunStatus)]  # type: ignore[valid-type]
Kind = Literal["calibrated", "raw"]


def _time(what: str = "") -> Any:
    """A time field: ISO 8601 with its offset (UTC), or null where it has not happened."""
    return Field(description=f"{what} (ISO 8601, UTC)".strip())


class Error(BaseModel):
    """Every answer that is not a success."""

    error: str = Field(description="what went wrong, and what to do about it")


ERRORS = {
    400: "A Host that is not in ALLOWED_HOSTS; for a request that changes something, a body that is not "
    "application/json (multipart/form-data for images and slides), or a form that cannot be read.",
    401: "No API token, or a wrong or removed one, or an old one to be made again (WWW-Authenticate: Bearer).",
    403: "A request from a web page of another origin (Origin not the app's own nor in ALLOWED_ORIGINS), "
    "AUTH_MODE=none and a client not on the server's own machine, or a role that may not do this (editors "
    "only; a viewer reads only their own predictions).",
    404: "No run (or slide job) with this id, or no such address.",
    409: "The slide job has not succeeded (yet), so it has no such file.",
    413: "The body is larger than MAX_UPLOAD_MB (images, slides) or 1 MB (JSON); refused before it is read "
    "when its Content-Length says so.",
    422: "The request cannot be carried out as sent: a parameter that is not usable (or holds a NUL "
    "character), not an image, too many pixels (MAX_IMAGE_PIXELS), unusable run settings, no approved "
    "model... The message says which.",
    429: "Too many failed token attempts from this address (Retry-After seconds), or, for /predict, this "
    "person's pixel budget is in use.",
    500: "The server failed to answer; its log has the details.",
    503: "The server's sign-in settings are broken (AUTH_MODE, the accounts file), or, for /predict, it is "
    "classifying as many requests as it takes at once (Retry-After).",
}
GUARD = (400, 403, 422, 500)  # core/api/guard.py and core/api/site.py refuse these of any request


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of an endpoint's refusals, each an Error: `statuses` and GUARD's."""
    return {status: {"model": Error, "description": ERRORS[status]} for status in sorted({*statuses, *GUARD})}


class Health(BaseModel):
    status: Literal["ok", "no worker", "unavailable"]
    database: bool
    worker: bool | None = Field(description="a worker is alive; null when the database does not answer")
    queued: int | None = Field(None, description="runs waiting in the queue")
    error: str | None = Field(None, description="only when the database does not answer")


class Prediction(BaseModel):
    """One classified image, in the one vocabulary of a prediction (core/inference/service.py
    PREDICTION_FIELDS): /predict answers these, /predictions the same with when, who and through what."""

    image_name: str = Field(description="the file's name as sent")
    image_sha256: str = Field(description="sha256 of the file's bytes")
    width: int = Field(description="in pixels, as decoded")
    height: int
    size_bytes: int = Field(description="the file's size")
    predicted: str = Field(description="the class with the highest probability")
    probabilities: dict[str, float] = Field(description="class -> probability, of probability_kind")
    probability_kind: Kind = Field(
        description="calibrated (temperature-scaled on the run's validation images) or raw, for a run "
        "without a validation part"
    )
    refer: bool | None = Field(
        description="'uncertain, refer': the top probability is below refer_threshold, or refer_threshold "
        "is null; null when the run has no calibration (raw probabilities, no refer band)"
    )
    refer_threshold: float | None = Field(
        description="the calibrated top probability below which a prediction is referred. null with refer "
        "true: no threshold can promise refer_target from the run's validation images, so every prediction "
        "is referred; null with refer null: no refer band"
    )
    refer_target: float | None = Field(
        description="the accuracy the predictions at or above refer_threshold reach with 95% confidence (a "
        "lower bound on the run's validation images); null without a refer band"
    )
    run_id: int = Field(description="the run whose model classified it")
    model_sha256: str = Field(description="sha256 of that run's model file")


class PredictResponse(BaseModel):
    run_id: int
    model_sha256: str
    predictions: list[Prediction] = Field(description="each image's answer, in the order sent")


class LoggedPrediction(Prediction):
    id: int
    at: str = _time("when it was classified")
    user: str = Field(description="who classified it")
    source: Literal["page", "api", "cli"]


class Predictions(BaseModel):
    predictions: list[LoggedPrediction] = Field(description="newest first (a viewer's: their own rows)")


class Model(BaseModel):
    """A succeeded run whose model file can classify images."""

    run_id: int
    label: str
    dataset: str
    classes: list[str]
    image_size: int
    protocol: str
    leaky: bool
    test_accuracy: float | None
    calibrated: bool
    model_sha256: str | None = Field(description="sha256 of its model file")
    approved: bool = Field(description="the approved model of its class set")
    default: bool = Field(description="the model /predict uses when no run is named")
    finished_at: str | None = _time("ended at; null until it ends")


class Models(BaseModel):
    models: list[Model] = Field(description="newest first")


class Progress(BaseModel):
    fraction: float
    text: str


class Run(BaseModel):
    """One run as the Runs table lists it."""

    id: int
    status: Status
    label: str
    dataset: str
    classes: list[str]
    protocol: str
    leaky: bool
    grouped: bool | None = Field(description="whether its split keeps each specimen on one side")
    experiment: str = Field(description="shared by the folds of one k-fold experiment")
    fold: int
    seed: int
    weights: str
    device: str | None
    created_at: str | None = _time("queued at")
    created_by: str | None
    started_at: str | None = _time("began at; null while queued")
    finished_at: str | None = _time("ended at; null until it ends")
    seconds: float | None
    epochs: int
    epochs_done: int
    progress: Progress
    test_accuracy: float | None
    cancel_requested: bool


class Runs(BaseModel):
    runs: list[Run] = Field(description="newest first")


class RunDetail(Run):
    """One run with its settings, what it found out, where it is and its epochs: the Runs page's panel."""

    config: RunConfigModel  # type: ignore[valid-type]
    summary: dict[str, Any] = Field(description="what the run found out")
    progress_detail: dict[str, Any]
    error: str | None
    epoch_metrics: list[dict[str, Any]] = Field(description="one object per epoch: losses, accuracies, time")
    report: dict[str, Any] | None = Field(description="the test report: accuracy, per-class rows, confusion matrix")
    uncertainty: dict[str, Any] | None
    model_file: bool = Field(description="its model file is on the server")


class QueuedRuns(BaseModel):
    run_ids: list[int] = Field(description="one per fold for k-fold")
    runs: list[Run]


class SlideJob(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)  # SlideVerdict's field notes describe it

    id: int
    run_id: int
    slide_name: str
    user: str
    status: Status
    created_at: str | None = _time("queued at")
    started_at: str | None = _time("began at; null while queued")
    finished_at: str | None = _time("ended at; null until it ends")
    tiles_done: int
    tiles_total: int | None = Field(description="null until tiled")
    seconds_left: float | None = Field(description="at the rate so far")
    error: str | None
    verdict: SlideVerdict | None  # the record core/jobs/views/slides.py reads, served as it is
    url: str
    geojson_url: str | None = Field(None, description="once it has succeeded")
    tiles_csv_url: str | None = Field(None, description="once it has succeeded")


# Request bodies an endpoint reads itself (core/api/bodies.py), named here for the document.


class PredictForm(BaseModel):
    """POST /predict as multipart/form-data."""

    images: list[bytes] = Field(description="TIFF, PNG, JPEG or BMP files, one part each")
    run: int | None = Field(None, description="as the query parameter")


class SlideForm(BaseModel):
    """POST /slides as multipart/form-data: the slide's file."""

    slide: bytes = Field(description="an SVS, NDPI, SCN, BIF, CZI or pyramidal TIFF file")
    run: int | None = Field(None, description="the run whose model classifies (default: the approved model)")
    mpp: float | None = Field(None, description="microns per pixel, for a slide whose file has none")


class SlidePath(BaseModel):
    """POST /slides as JSON: a slide already on the server."""

    path: str = Field(description="a slide on the server, under IMPORT_ROOTS")
    run: int | None = None
    mpp: float | None = None


# Reviews and field accuracy (core/review) -------------------------------------------------------


class Review(BaseModel):
    """One reviewer's verdict on a logged prediction."""

    log_id: int = Field(description="the prediction's id in the log (GET /predictions)")
    run_id: int
    predicted: str = Field(description="the model's class")
    reviewer: str
    reviewed_at: str = _time("when it was reviewed")
    true_class: str | None = Field(description="the reviewer's class; null: the reviewer could not tell")
    note: str
    blind: bool = Field(description="given without seeing the model's answer")


class QueueEntry(LoggedPrediction):
    image_kept: bool = Field(description="the image is kept for review (REVIEWS=1 keeps the referred ones)")
    reviews: list[Review] = Field(description="its reviews so far, every reviewer's")
    disagreement: bool = Field(description="two reviews name different classes (or one could not tell)")


class ReviewQueue(BaseModel):
    items: list[QueueEntry] = Field(description="referred predictions first, then the least confident")
    matched: int = Field(description="logged predictions within the filters not yet reviewed by the caller")
    all_scanned: bool = Field(description="false: so many matched that only the newest were ordered")


class ReviewRequest(BaseModel):
    """A review of a logged prediction (POST /reviews); editors."""

    model_config = {"extra": "forbid", "strict": True}
    log_id: int = Field(ge=0, description="the prediction's id in the log")
    true_class: str | None = Field(description="one of the model's classes; null: cannot tell")
    note: str = Field("", description="why, in the reviewer's words")
    blind: bool = Field(
        False,
        description="the reviewer gave this class without seeing the model's answer (field accuracy counts "
        "how many were; a verdict given seeing it can lean toward it)",
    )


class FieldWeek(BaseModel):
    week: str = Field(description="its Monday (ISO 8601 date); predictions grouped by when they were made, UTC")
    predictions: int
    referred: int
    counted: int
    right: int
    class_reviews: int
    overruled: int


class FieldAccuracy(BaseModel):
    """A model's accuracy on reviewed predictions (protocol: field), not on its test split."""

    run_id: int
    classes: list[str]
    reviewed: int = Field(description="logged predictions with at least one review")
    counted: int = Field(description="those whose reviews all name one class: what accuracy is over")
    disagreements: int = Field(description="left out: reviewers disagree")
    cannot_tell: int = Field(description="left out: no reviewer could tell")
    accuracy: float | None = Field(description="null while no case is counted")
    low: float | None = Field(description="bootstrap interval at `level`")
    high: float | None
    level: float
    recall: list[float | None] = Field(description="per true class, in `classes` order; null: no case")
    confusion: list[list[int]] = Field(description="rows: the reviewed class, columns: the model's")
    predictions: int = Field(description="the model's predictions still in the log")
    referred: int
    referred_share: float | None
    class_reviews: int = Field(description="reviews naming a class")
    overruled: int = Field(description="of those, naming another class than the model's")
    overruled_share: float | None
    blind: int = Field(description="of the reviews naming a class, those given without seeing the model's answer")
    blind_counted: int = Field(description="counted cases whose every review was given blind")
    blind_accuracy: float | None = Field(description="accuracy over those; null: none")
    blind_low: float | None = Field(description="its bootstrap interval at `level`")
    blind_high: float | None
    paired: int = Field(description="cases with two reviews or more")
    paired_agreed: int = Field(description="of those, the cases whose first two reviews agree")
    kappa: float | None = Field(
        description="their agreement corrected for chance (Fleiss' kappa, two ratings a case, 'cannot tell' a "
        "category of its own); null: undefined (under 2 such cases, or one verdict only)"
    )
    weeks: list[FieldWeek] = Field(description="oldest first")
