"""The API's routes under /api/v1 (`api_routes`), each over the core function its page calls:

  GET  /health        no token: the database answers, a worker is alive (503 when the database does not)
  GET  /openapi.json  no token: the OpenAPI 3.1 document of all of these (core/api/openapi.py)
  POST /predict       classify images (core/inference/service.py, as the Predict page does), logged as "api";
                      413, 429 or 503 past the limits of core/inference/admission.py
  GET  /models        succeeded runs whose model file can classify, and which are approved
  GET  /runs          the Runs table; GET /runs/{id}: one run with its settings, progress, metrics, epochs
  POST /runs          queue a training run from RunConfig's JSON (editors), as the Train page does
  GET  /predictions   the prediction log
  POST /slides        classify a whole slide in the background (core/jobs/slide_jobs.py): 202 and its address
  GET  /slides/{id}   the job: status, tiles done of total, time left, and once done the slide's verdict;
                      /slides/{id}/geojson (one square per tile, for QuPath) and /slides/{id}/tiles.csv

Database work, reading files and running the model happen off the event loop (run_in_threadpool),
so a long classification never holds up the pages that share the server.

Before any endpoint runs, core/api/guard.py refuses what a web page could send in a browser's name:
an Origin that is not the app's own or in ALLOWED_ORIGINS (403), and a request that changes something
without a JSON (or, for /predict, multipart) body (400); serve.py has already refused a Host that is
not in ALLOWED_HOSTS (core/api/site.py). Values that cannot name anything are 4xx, never 500: a run id
past the database's 64-bit ids (404 in the path, 422 as `run`), a time whose offset moves it out of
the calendar, a NUL character, JSON nested past its depth limit (core/api/bodies.py).

The prediction log holds file names, which often carry patient identifiers: a viewer reads only the
rows of their own predictions (a `user` filter naming someone else is 403), an editor reads every row;
the rule is core/inference/prediction_log.py's, so the Predict page's history follows it too.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route, Router

from core.access.accounts import User
from core.api import bodies, openapi, payloads
from core.api.auth import Authenticator, require_editor
from core.api.errors import ApiError, JsonErrors, not_found
from core.api.guard import ApiGuard
from core.api.run_configs import config_from_json, run_words
from core.config import Settings, load_settings
from core.errors import UserError
from core.inference import admission, approval, prediction_log, service
from core.jobs import runs, views, worker
from core.store.runs import model_path

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
MAX_LOG_ROWS = 10_000
MAX_ID = 2**63 - 1  # the database's ids are 64-bit integers: a larger one names no row and cannot be sent


class Id64Convertor(Convertor[int]):
    """A path's id: at most 19 digits (longer paths match no route: 404), so that the thousands of
    digits a path may carry never reach int() (which refuses past 4300 digits) or the database."""

    regex = "[0-9]{1,19}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id64", Id64Convertor())


def api_routes(settings: Settings | None = None, prefix: str = API_PREFIX) -> list[BaseRoute]:
    """The API as one Starlette route, mounted at `prefix` (settings: the environment's by default)."""
    api = Api(settings or load_settings(), prefix)
    router = Router(
        [
            Route("/health", api.health, methods=["GET"]),
            Route("/openapi.json", api.openapi, methods=["GET"]),
            Route("/predict", api.predict, methods=["POST"]),
            Route("/models", api.models, methods=["GET"]),
            Route("/runs", api.runs, methods=["GET"]),
            Route("/runs", api.queue_run, methods=["POST"]),
            Route("/runs/{run_id:id64}", api.run, methods=["GET"]),
            Route("/predictions", api.predictions, methods=["GET"]),
            Route("/slides", api.queue_slide, methods=["POST"]),
            Route("/slides/{job_id:id64}", api.slide, methods=["GET"]),
            Route("/slides/{job_id:id64}/geojson", api.slide_file, methods=["GET"]),
            Route("/slides/{job_id:id64}/tiles.csv", api.slide_file, methods=["GET"]),
        ],
        default=not_found,
    )
    return [Mount(prefix, app=JsonErrors(ApiGuard(router, api.settings)))]


# --------------------------------------------------------------------------------------------
# Query parameters


def int_param(value: str | None, name: str, low: int = 0, high: int = MAX_ID) -> int | None:
    """A whole number from `low` to `high` (by default any id the database can hold); 422 otherwise."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError(422, f"'{name}' must be a whole number, not {value[:40]!r}.") from None
    if not low <= number <= high:
        raise ApiError(422, f"'{name}' must be a whole number from {low} to {high}, not {value[:40]}.")
    return number


def mpp_param(value: str | None) -> float | None:
    """A slide's microns per pixel (core/slides/reader.py check_mpp); 422 otherwise."""
    if value is None or value == "":
        return None
    from core.slides.reader import check_mpp

    try:
        return check_mpp(float(value), "'mpp'")
    except (ValueError, UserError):
        raise ApiError(
            422, f"'mpp' must be the slide's microns per pixel, from 0.05 to 20, not {value[:40]!r}."
        ) from None


def time_param(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 time as the database keeps it (UTC, no offset); one without an offset is UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # Its offset can move a time at the calendar's ends (year 1, year 9999) out of it: OverflowError.
        return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment
    except (ValueError, OverflowError):
        raise ApiError(
            422,
            f"'{name}' must be an ISO 8601 time from year 1 to 9999 in UTC, such as "
            f"2026-01-31T09:00:00Z, not {value[:60]!r}.",
        ) from None


# --------------------------------------------------------------------------------------------
# The endpoints


class Api:
    def __init__(self, settings: Settings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix

    @cached_property
    def Session(self):
        return views.sessions(self.settings.database_url)

    @cached_property
    def auth(self) -> Authenticator:
        return Authenticator(self.settings, self.Session)

    async def user(self, request: Request) -> User:
        return await run_in_threadpool(self.auth.user, request)

    async def health(self, request: Request) -> JSONResponse:
        return await run_in_threadpool(self._health)

    def _health(self) -> JSONResponse:
        try:
            with self.Session() as s:
                panel = views.worker_panel(s, self.settings)
        except (SQLAlchemyError, OSError):
            log.exception("health check: the database does not answer")
            return JSONResponse(
                {
                    "status": "unavailable",
                    "database": False,
                    "worker": None,
                    "queued": None,
                    "error": "The database does not answer; the server's log says why.",
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ok" if panel.alive else "no worker",
                "database": True,
                "worker": panel.alive,
                "queued": panel.queued,
            }
        )

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi.document(self.prefix))

    async def predict(self, request: Request) -> JSONResponse:
        user = await self.user(request)
        images, form_run = await bodies.read_images(request, self.settings)
        run_id = int_param(request.query_params.get("run") or form_run, "run")
        if run_id is not None:
            await run_in_threadpool(self._known_run, run_id)
        try:
            results = await run_in_threadpool(
                service.classify, self.Session, self.settings, user, images, run_id=run_id, source="api"
            )
        except admission.TooManyPixels as e:
            raise ApiError(413, str(e)) from None
        except admission.UserBusy as e:
            raise ApiError(429, str(e)) from None
        except admission.ServerBusy as e:
            raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
        return JSONResponse(
            {
                "run_id": results[0].run_id,
                "model_sha256": results[0].model_sha256,
                "predictions": [payloads.classified_json(c) for c in results],
            }
        )

    def _known_run(self, run_id: int) -> None:
        with self.Session() as s:
            try:
                views.run_row(s, run_id)
            except UserError as e:
                raise ApiError(404, str(e)) from None

    async def models(self, request: Request) -> JSONResponse:
        await self.user(request)
        return JSONResponse({"models": await run_in_threadpool(self._models)})

    def _models(self) -> list[dict]:
        with self.Session() as s:
            rows = views.run_rows(s, status="succeeded")
            approved = {a.run_id for a in approval.current_approvals(s)}
            default = approval.approved_run(s)
        usable = [(r, model_path(self.settings, r.id)) for r in rows]
        return [
            {
                **payloads.model_json(r, approval.file_sha256(path), r.id in approved),
                "default": default is not None and default.run_id == r.id,
            }
            for r, path in usable
            if path.exists()
        ]

    async def runs(self, request: Request) -> JSONResponse:
        await self.user(request)
        status, dataset = request.query_params.get("status"), request.query_params.get("dataset")
        if status is not None and status not in views.STATUSES:
            raise ApiError(422, f"'status' must be one of {', '.join(views.STATUSES)}, not {status!r}.")
        return JSONResponse({"runs": await run_in_threadpool(self._runs, status, dataset)})

    def _runs(self, status: str | None, dataset: str | None) -> list[dict]:
        with self.Session() as s:
            return [payloads.run_json(r) for r in views.run_rows(s, dataset=dataset, status=status)]

    async def run(self, request: Request) -> JSONResponse:
        await self.user(request)
        run_id = request.path_params["run_id"]
        if run_id > MAX_ID:  # 19 digits can pass the largest id, which the database cannot even be asked for
            raise ApiError(404, f"No run with id {str(run_id)[:40]}.")
        return JSONResponse(await run_in_threadpool(self._run, run_id))

    def _run(self, run_id: int) -> dict:
        with self.Session() as s:
            try:
                curves = views.run_curve(s, run_id)
                results = views.run_results(s, self.settings, run_id)
            except UserError as e:
                raise ApiError(404, str(e)) from None
        body = payloads.run_detail_json(curves, results.error)
        body["report"] = payloads.plain(results.report)  # the test report (Table I) of a succeeded run
        body["uncertainty"] = payloads.plain(results.uncertainty)
        body["model_file"] = results.model_file is not None
        return body

    async def queue_run(self, request: Request) -> JSONResponse:
        user = await self.user(request)
        require_editor(user, "launch training runs")
        data = await bodies.read_json(request)
        name, notes = run_words(data)
        config = config_from_json(data, self.settings)
        rows = await run_in_threadpool(self._queue, config, user, name, notes)
        return JSONResponse(
            {"run_ids": [r["id"] for r in rows], "runs": rows},
            status_code=201,
            headers={"Location": f"{self.prefix}/runs/{rows[0]['id']}"},
        )

    def _queue(self, config, user: User, name: str | None, notes: str | None) -> list[dict]:
        """As the Train page launches: the weights checked first, the runs recorded, a worker made sure of."""
        from core.training.model import check_weights  # torch: only when queueing

        check_weights(config.weights)
        with self.Session.begin() as s:
            ids = [r.id for r in runs.create_runs(s, self.settings, config, user=user, name=name, notes=notes)]
        worker.ensure_worker(self.settings)
        with self.Session() as s:
            return [payloads.run_json(views.run_row(s, i)) for i in ids]

    async def predictions(self, request: Request) -> JSONResponse:
        user = await self.user(request)
        q = request.query_params
        limit = int_param(q.get("limit"), "limit", 1, MAX_LOG_ROWS) or prediction_log.DEFAULT_LIMIT
        filters = dict(
            since=time_param(q.get("since"), "since"),
            until=time_param(q.get("until"), "until"),
            run_id=int_param(q.get("run"), "run"),
            user=q.get("user") or None,
            predicted=q.get("predicted") or None,
            limit=limit,
        )
        return JSONResponse({"predictions": await run_in_threadpool(self._predictions, user, filters)})

    def _predictions(self, reader: User, filters: dict) -> list[dict]:
        with self.Session() as s:
            try:
                rows = prediction_log.list_predictions(s, reader=reader, **filters)
            except UserError as e:  # a viewer asking for someone else's rows
                raise ApiError(403, str(e)) from None
            return [payloads.logged_json(p) for p in rows]

    # Whole slides ----------------------------------------------------------------------------

    async def queue_slide(self, request: Request) -> JSONResponse:
        user = await self.user(request)
        upload, fields = await bodies.read_slide(request, self.settings)
        run_id = int_param(fields.get("run"), "run")
        mpp = mpp_param(fields.get("mpp"))
        try:
            job_id = await run_in_threadpool(self._queue_slide, user, upload, fields.get("path"), run_id, mpp)
        finally:
            if upload is not None:
                await request.state.slide_form.close()
        body = await run_in_threadpool(self._slide, user, job_id)
        return JSONResponse(body, status_code=202, headers={"Location": f"{self.prefix}/slides/{job_id}"})

    def _queue_slide(self, user: User, upload, path: str | None, run_id: int | None, mpp: float | None) -> int:
        from core.jobs import slide_jobs

        with self.Session() as s:
            try:
                run_id = service.resolve_run(s, self.settings, run_id)
            except UserError as e:
                raise ApiError(422, e.for_api()) from None
        self._known_run(run_id)
        if upload is not None:
            name = upload.filename or "slide"
            stored = slide_jobs.store_upload(
                self.settings, name, upload.file, bodies.upload_limit(self.settings) or 2**62
            )
            job_id = slide_jobs.queue_slide(
                self.Session, self.settings, user, run_id, name=name, path=stored, uploaded=True, source="api", mpp=mpp
            )
        else:
            job_id = slide_jobs.queue_slide(
                self.Session,
                self.settings,
                user,
                run_id,
                name=Path(path).name,
                path=Path(path),
                uploaded=False,
                source="api",
                mpp=mpp,
            )
        worker.ensure_worker(self.settings)
        return job_id

    def _job(self, user: User, job_id: int):
        """The job, if `user` may see it (its owner, or an editor): 404 otherwise, as for a job that is not."""
        from core.jobs import slide_jobs

        with self.Session() as s:
            try:
                view = slide_jobs.slide_job(s, self.settings, job_id)
            except UserError:
                view = None
        if view is None or not (user.can_edit or view.user == user.name):
            raise ApiError(404, f"No slide job with id {job_id}.")
        return view

    async def slide(self, request: Request) -> JSONResponse:
        user = await self.user(request)
        return JSONResponse(await run_in_threadpool(self._slide, user, request.path_params["job_id"]))

    def _slide(self, user: User, job_id: int) -> dict:
        return payloads.slide_job_json(self._job(user, job_id), self.prefix)

    async def slide_file(self, request: Request):
        from starlette.responses import FileResponse

        user = await self.user(request)
        view = await run_in_threadpool(self._job, user, request.path_params["job_id"])
        geojson = request.url.path.endswith("/geojson")
        path = view.file("slide.geojson" if geojson else "slide.tiles.csv")
        if path is None:
            raise ApiError(409, f"Slide job {view.id} is {view.status.value}; its files come once it has succeeded.")
        stem = Path(view.slide_name).stem or "slide"
        return FileResponse(
            path,
            media_type="application/geo+json" if geojson else "text/csv",
            filename=f"{stem}.geojson" if geojson else f"{stem}.tiles.csv",
        )
