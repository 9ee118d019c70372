"""The API under /api/v1 (`api_routes`): a FastAPI app whose endpoints each call the core function their
page calls. FastAPI writes its OpenAPI document from these signatures and the models of
core/api/schemas.py:

  GET  /health        no token: the database answers, a worker is alive (503 when the database does not)
  GET  /openapi.json  no token: the OpenAPI 3.1 document of all of these; /docs shows it to try out
  POST /predict       classify images (core/inference/service.py, as the Predict page does), logged as "api";
                      413, 429 or 503 past the limits of core/inference/admission.py
  GET  /models        succeeded runs whose model file can classify, and which are approved
  GET  /runs          the Runs table; GET /runs/{id}: one run with its settings, progress, metrics, epochs
  POST /runs          queue a training run from RunConfig's JSON (editors), as the Train page does
  GET  /predictions   the prediction log
  GET  /models/{id}/field  the model's accuracy on reviewed predictions (core/review/field.py)
  GET  /reviews/queue and POST /reviews  the Review page's queue and verdicts (editors; core/review)
  POST /slides        classify a whole slide in the background (core/jobs/slide_jobs.py): 202 and its address
  GET  /slides/{id}   the job: status, tiles done of total, time left, and once done the slide's verdict;
                      /slides/{id}/geojson (one square per tile, for QuPath) and /slides/{id}/tiles.csv

Database work, reading files and running the model happen off the event loop (run_in_threadpool),
so a long classification never holds up the pages that share the server. Request bodies are read by
the endpoints themselves (core/api/bodies.py), never by FastAPI, so that a body past its limit is
refused before it is read; the document names them through `openapi_extra`.

Before any endpoint runs, core/api/guard.py refuses what a web page could send in a browser's name:
an Origin that is not the app's own or in ALLOWED_ORIGINS (403), and a request that changes something
without a JSON (or, for /predict, multipart) body (400); serve.py has already refused a Host that is
not in ALLOWED_HOSTS (core/api/site.py). Every refusal is JSON (core/api/errors.py).

The prediction log holds file names, which often carry patient identifiers: a viewer reads only the
rows of their own predictions (a `user` filter naming someone else is 403), an editor reads every row;
the rule is core/inference/prediction_log.py's, so the Predict page's history follows it too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount

from core.access.accounts import User
from core.api import bodies, schemas
from core.api.auth import require_editor
from core.api.errors import ApiError, JsonErrors, http_error
from core.api.guard import ApiGuard
from core.api.handlers import Api
from core.api.params import (
    DatasetFilter,
    JobId,
    LimitQuery,
    PredictedFilter,
    RunFilter,
    RunId,
    RunQuery,
    SinceFilter,
    StatusFilter,
    UntilFilter,
    UserFilter,
    int_param,
    mpp_param,
)
from core.api.run_configs import RunRequest, run_request
from core.api.schemas import error_responses
from core.config import Settings, load_settings
from core.inference import prediction_log

API_PREFIX = "/api/v1"
VERSION = "1.0.0"
DESCRIPTION = (
    "Classify H&E images and whole slides, follow and queue training runs, read the prediction log, review "
    "predictions and read a model's accuracy on the reviewed ones. "
    "Bearer tokens come from `python -m core token add NAME --role viewer|editor`; with "
    "AUTH_MODE=none the API answers only on the server's own machine. A request that changes something "
    "sends application/json (images and slides: multipart/form-data); one from a web page of another "
    'origin is refused. Every error is JSON {"error": message}.'
)
# Swagger UI's files as the fastapi-offline package ships them, served from here: the docs page
# runs no script from another site (a CDN's script on this origin could call the API as its user).
SWAGGER_FILES = Path(fastapi_offline.__file__).parent / "static"

bearer = HTTPBearer(
    auto_error=False,  # core/api/auth.py says who is asking, and answers 401 in the API's words
    scheme_name="bearer",
    bearerFormat="lk_<id>_<secret>",
    description="An API token: `python -m core token add NAME --role viewer`.",
)


class JsonRoute(APIRoute):
    """An endpoint whose failures are answered here as JSON (core/api/errors.py), FastAPI's refusals
    of its parameters included; an unexpected one is logged and answered 500 without reaching the
    server's error middleware, which would send its own answer and raise it again."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answered(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - the edge: every failure becomes a JSON answer
                return JsonErrors.answer(exc)

        return answered


def api_of(request: Request) -> Api:
    return request.app.state.api


async def caller(request: Request, _: Annotated[Any, Security(bearer)] = None) -> User:
    """Who is asking (core/api/auth.py: 401, 403, 429 or 503 when no one may)."""
    return await run_in_threadpool(api_of(request).auth.user, request)


ApiOf = Annotated[Api, Depends(api_of)]
Caller = Annotated[User, Depends(caller)]
router = APIRouter(route_class=JsonRoute)


def api_app(settings: Settings, prefix: str = API_PREFIX) -> FastAPI:
    """The API as a FastAPI app, to be mounted at `prefix`."""
    app = FastAPI(
        title="Lymphoma subtype recognition API",
        version=VERSION,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # served below, with Swagger UI's files at a fixed version
        redoc_url=None,
        exception_handlers={HTTPException: http_error},
        # Nothing is exported from here; refusals can quote file names, which may identify patients.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.api = Api(settings, prefix)
    app.include_router(router)
    app.openapi = _our_errors_only(app.openapi)

    app.mount("/docs-files", StaticFiles(directory=SWAGGER_FILES), name="docs-files")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title}: try it out",
            swagger_js_url=f"{root}/docs-files/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-files/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    return app


def api_routes(settings: Settings | None = None, prefix: str = API_PREFIX) -> list[BaseRoute]:
    """The API as one Starlette route, mounted at `prefix` (settings: the environment's by default)."""
    settings = settings or load_settings()
    return [Mount(prefix, app=JsonErrors(ApiGuard(api_app(settings, prefix), settings)))]


def _our_errors_only(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI's document without the 422 body of its own validation errors, which this API never
    sends (core/api/errors.py answers them as an Error, and an id in the path as a 404)."""

    def document() -> dict[str, Any]:
        openapi = generate()  # made once and kept by FastAPI; this takes its 422s out the first time
        for operation in (op for path in openapi["paths"].values() for op in path.values()):
            if "HTTPValidationError" in str(operation.get("responses", {}).get("422", "")):
                del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            openapi.get("components", {}).get("schemas", {}).pop(name, None)
        return openapi

    return document


def _body(**models: type) -> dict[str, Any]:
    """`openapi_extra` naming the body an endpoint reads itself (core/api/bodies.py): a model for each
    content type it takes (`json`, `form`)."""
    types = {"json": "application/json", "form": "multipart/form-data"}
    content = {types[kind]: {"schema": model.model_json_schema()} for kind, model in models.items()}
    return {"requestBody": {"required": True, "content": content}}


# --------------------------------------------------------------------------------------------
# The endpoints


@router.get(
    "/health",
    operation_id="health",
    response_model=schemas.Health,
    response_description="The database answers",
    summary="Whether the database answers and a worker is alive",
    responses={**error_responses(), 503: {"model": schemas.Health, "description": "The database does not answer"}},
)
async def health(api: ApiOf) -> JSONResponse:
    return await run_in_threadpool(api.health)


@router.post(
    "/predict",
    operation_id="predict",
    response_model=schemas.PredictResponse,
    response_description="Each image's answer, in the order sent",
    summary="Classify images (logged as source 'api')",
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503),
    openapi_extra=_body(form=schemas.PredictForm),
)
async def predict(request: Request, api: ApiOf, user: Caller, run: RunQuery = None) -> JSONResponse:
    images, form_run = await bodies.read_images(request, api.settings)
    run_id = run if run is not None else int_param(form_run, "run")
    return JSONResponse(await api.predict(user, images, run_id))


@router.get(
    "/models",
    operation_id="models",
    response_model=schemas.Models,
    response_description="The models, newest first",
    summary="Succeeded runs whose model can classify",
    responses=error_responses(401, 429, 503),
)
async def models(api: ApiOf, user: Caller) -> JSONResponse:
    return JSONResponse({"models": await run_in_threadpool(api.models)})


@router.get(
    "/runs",
    operation_id="listRuns",
    response_model=schemas.Runs,
    response_description="The runs",
    summary="The runs, newest first",
    responses=error_responses(401, 422, 429, 503),
)
async def runs(api: ApiOf, user: Caller, status: StatusFilter = None, dataset: DatasetFilter = None) -> JSONResponse:
    return JSONResponse({"runs": await run_in_threadpool(api.runs, status, dataset)})


@router.post(
    "/runs",
    operation_id="queueRun",
    status_code=201,
    response_model=schemas.QueuedRuns,
    response_description="Queued; Location names the first run",
    summary="Queue a training run (one per fold for k-fold); editors",
    responses=error_responses(400, 401, 403, 413, 422, 429, 503),
    openapi_extra=_body(json=RunRequest),
)
async def queue_run(request: Request, api: ApiOf, user: Caller) -> JSONResponse:
    require_editor(user, "launch training runs")
    config, name, notes = run_request(await bodies.read_json(request), api.settings)
    rows = await run_in_threadpool(api.queue_run, config, user, name, notes)
    return JSONResponse(
        {"run_ids": [r["id"] for r in rows], "runs": rows},
        status_code=201,
        headers={"Location": f"{api.prefix}/runs/{rows[0]['id']}"},
    )


@router.get(
    "/runs/{run_id:id64}",
    operation_id="getRun",
    response_model=schemas.RunDetail,
    response_description="The run",
    summary="One run: status, progress, settings, metrics, epochs",
    responses=error_responses(401, 404, 429, 503),
)
async def run(api: ApiOf, user: Caller, run_id: RunId) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(api.run, run_id))


@router.get(
    "/predictions",
    operation_id="listPredictions",
    response_model=schemas.Predictions,
    response_description="The log (a viewer's: their own rows)",
    summary="The prediction log, newest first",
    responses=error_responses(401, 403, 422, 429, 503),
)
async def predictions(
    api: ApiOf,
    user: Caller,
    since: SinceFilter = None,
    until: UntilFilter = None,
    run: RunFilter = None,
    by: UserFilter = None,
    predicted: PredictedFilter = None,
    limit: LimitQuery = prediction_log.DEFAULT_LIMIT,
) -> JSONResponse:
    filters = dict(since=since, until=until, run_id=run, user=by, predicted=predicted, limit=limit)
    return JSONResponse({"predictions": await run_in_threadpool(api.predictions, user, filters)})


# Reviews and field accuracy ------------------------------------------------------------------


@router.get(
    "/models/{run_id:id64}/field",
    operation_id="getFieldAccuracy",
    response_model=schemas.FieldAccuracy,
    response_description="Its accuracy on reviewed predictions, by week too",
    summary="A model's field accuracy: how it did on the predictions people reviewed",
    responses=error_responses(401, 404, 429, 503),
)
async def field(api: ApiOf, user: Caller, run_id: RunId) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(api.field, run_id))


@router.get(
    "/reviews/queue",
    operation_id="getReviewQueue",
    response_model=schemas.ReviewQueue,
    response_description="Predictions to review, referred first",
    summary="Logged predictions to review, those the model referred first; editors",
    responses=error_responses(401, 403, 422, 429, 503),
)
async def review_queue(api: ApiOf, user: Caller, run: RunFilter = None, limit: LimitQuery = 100) -> JSONResponse:
    require_editor(user, "review predictions")
    return JSONResponse(await run_in_threadpool(api.review_queue, user, run, limit))


@router.post(
    "/reviews",
    operation_id="review",
    status_code=201,
    response_model=schemas.Review,
    response_description="Recorded (the caller's earlier review of it replaced)",
    summary="Record the true class of a logged prediction, or that it cannot be told; editors",
    responses=error_responses(400, 401, 403, 413, 422, 429, 503),
    openapi_extra=_body(json=schemas.ReviewRequest),
)
async def review(request: Request, api: ApiOf, user: Caller) -> JSONResponse:
    require_editor(user, "review predictions")
    asked = review_request(await bodies.read_json(request))
    body = await run_in_threadpool(api.review, user, asked.log_id, asked.true_class, asked.note, asked.blind)
    return JSONResponse(body, status_code=201)


def review_request(body: Any) -> schemas.ReviewRequest:
    """The body of POST /reviews, or 422 saying what is wrong with it."""
    try:
        return schemas.ReviewRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, f"'{where}': {first['msg']}.") from None


# Whole slides --------------------------------------------------------------------------------


@router.post(
    "/slides",
    operation_id="queueSlide",
    status_code=202,
    response_model=schemas.SlideJob,
    response_description="Queued; Location names the job",
    summary="Classify a whole slide in the background (logged as 'api')",
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503),
    openapi_extra=_body(json=schemas.SlidePath, form=schemas.SlideForm),
)
async def queue_slide(request: Request, api: ApiOf, user: Caller) -> JSONResponse:
    upload, fields = await bodies.read_slide(request, api.settings)
    run_id = int_param(fields.get("run"), "run")
    mpp = mpp_param(fields.get("mpp"))
    try:
        job_id = await run_in_threadpool(api.queue_slide, user, upload, fields.get("path"), run_id, mpp)
    finally:
        if upload is not None:
            await request.state.slide_form.close()
    body = await run_in_threadpool(api.slide, user, job_id)
    return JSONResponse(body, status_code=202, headers={"Location": f"{api.prefix}/slides/{job_id}"})


@router.get(
    "/slides/{job_id:id64}",
    operation_id="getSlide",
    response_model=schemas.SlideJob,
    response_description="The job (a viewer's own only)",
    summary="A slide job: progress, then the slide's verdict",
    responses=error_responses(401, 404, 429, 503),
)
async def slide(api: ApiOf, user: Caller, job_id: JobId) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(api.slide, user, job_id))


@router.get(
    "/slides/{job_id:id64}/geojson",
    operation_id="getSlideGeojson",
    summary="One square per tile with its class, for QuPath",
    response_class=FileResponse,
    responses={
        200: {
            "description": "GeoJSON FeatureCollection in level-0 pixels",
            "content": {"application/geo+json": {"schema": {"type": "object"}}},
        },
        **error_responses(401, 404, 409, 429, 503),
    },
)
async def slide_geojson(api: ApiOf, user: Caller, job_id: JobId) -> FileResponse:
    return await api.slide_file(user, job_id, geojson=True)


@router.get(
    "/slides/{job_id:id64}/tiles.csv",
    operation_id="getSlideTiles",
    summary="One row per tile: position, class, probabilities",
    response_class=FileResponse,
    responses={
        200: {"description": "CSV", "content": {"text/csv": {"schema": {"type": "string"}}}},
        **error_responses(401, 404, 409, 429, 503),
    },
)
async def slide_tiles(api: ApiOf, user: Caller, job_id: JobId) -> FileResponse:
    return await api.slide_file(user, job_id, geojson=False)
