"""What the API's endpoints (core/api/routes.py) do once a request has been read: the core functions
their pages call, with the database's sessions and the authenticator of one app. Each method but the
async ones runs off the event loop (the endpoints call it through run_in_threadpool) and answers with
the JSON bodies of core/api/payloads.py, or raises ApiError."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse

from core.access.accounts import User
from core.api import bodies, payloads
from core.api.auth import Authenticator
from core.api.errors import ApiError
from core.config import Settings
from core.errors import UserError
from core.inference import admission, approval, prediction_log, service
from core.inference.service import ImageInput
from core.jobs import runs, views, worker
from core.store.runs import model_path

log = logging.getLogger(__name__)


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

    def health(self) -> JSONResponse:
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

    async def predict(self, user: User, images: list[ImageInput], run_id: int | None) -> dict:
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
        return {
            "run_id": results[0].run_id,
            "model_sha256": results[0].model_sha256,
            "predictions": [payloads.classified_json(c) for c in results],
        }

    def _known_run(self, run_id: int) -> None:
        with self.Session() as s:
            try:
                views.run_row(s, run_id)
            except UserError as e:
                raise ApiError(404, str(e)) from None

    def models(self) -> list[dict]:
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

    def runs(self, status: str | None, dataset: str | None) -> list[dict]:
        with self.Session() as s:
            return [payloads.run_json(r) for r in views.run_rows(s, dataset=dataset, status=status)]

    def run(self, run_id: int) -> dict:
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

    def queue_run(self, config, user: User, name: str | None, notes: str | None) -> list[dict]:
        """As the Train page launches: the weights checked first, the runs recorded, a worker made sure of."""
        from core.training.model import check_weights  # torch: only when queueing

        check_weights(config.weights)
        with self.Session.begin() as s:
            ids = [r.id for r in runs.create_runs(s, self.settings, config, user=user, name=name, notes=notes)]
        worker.ensure_worker(self.settings)
        with self.Session() as s:
            return [payloads.run_json(views.run_row(s, i)) for i in ids]

    def predictions(self, reader: User, filters: dict) -> list[dict]:
        with self.Session() as s:
            try:
                rows = prediction_log.list_predictions(s, reader=reader, **filters)
            except UserError as e:  # a viewer asking for someone else's rows
                raise ApiError(403, str(e)) from None
            return [payloads.logged_json(p) for p in rows]

    # Reviews -------------------------------------------------------------------------------------

    def field(self, run_id: int) -> dict:
        from core.review.field import field_accuracy

        self._known_run(run_id)
        with self.Session() as s:
            return payloads.plain(field_accuracy(s, run_id).to_json())

    def review_queue(self, user: User, run_id: int | None, limit: int) -> dict:
        from core.review.queue import QueueFilters, review_queue

        with self.Session() as s:
            found = review_queue(s, self.settings, user, QueueFilters(run_id=run_id), limit=limit)
        return {
            "items": [payloads.queue_entry_json(item) for item in found.items],
            "matched": found.matched,
            "all_scanned": found.scanned_all,
        }

    def review(self, user: User, log_id: int, true_class: str | None, note: str, blind: bool) -> dict:
        from core.review.store import record_review

        with self.Session.begin() as s:
            record = record_review(s, self.settings, user, log_id, true_class, note, blind=blind)
            return payloads.review_json(record)

    # Whole slides ----------------------------------------------------------------------------

    def queue_slide(self, user: User, upload, path: str | None, run_id: int | None, mpp: float | None) -> int:
        from core.jobs import slide_jobs

        with self.Session() as s:
            try:
                run_id = service.resolve_run(s, self.settings, run_id)
            except UserError as e:
                raise ApiError(422, e.for_api()) from None
        self._known_run(run_id)
        if upload is not None:
            name = upload.filename or "slide"
            limit = bodies.upload_limit(self.settings) or 2**62
            stored = slide_jobs.store_upload(self.settings, name, upload.file, limit)
            source = dict(name=name, path=stored, uploaded=True)
        else:
            source = dict(name=Path(path).name, path=Path(path), uploaded=False)
        job_id = slide_jobs.queue_slide(self.Session, self.settings, user, run_id, source="api", mpp=mpp, **source)
        worker.ensure_worker(self.settings)
        return job_id

    def _job(self, user: User, job_id: int):
        """The job, if `user` may see it (its owner, or an editor): 404 otherwise, as for a job that is not."""

        with self.Session() as s:
            try:
                view = views.slide_job(s, self.settings, job_id)
            except UserError:
                view = None
        if view is None or not (user.can_edit or view.user == user.name):
            raise ApiError(404, f"No slide job with id {job_id}.")
        return view

    def slide(self, user: User, job_id: int) -> dict:
        return payloads.slide_job_json(self._job(user, job_id), self.prefix)

    async def slide_file(self, user: User, job_id: int, geojson: bool) -> FileResponse:
        """The succeeded job's GeoJSON or tiles CSV; 409 before it has succeeded."""
        view = await run_in_threadpool(self._job, user, job_id)
        path = view.file("slide.geojson" if geojson else "slide.tiles.csv")
        if path is None:
            raise ApiError(409, f"Slide job {view.id} is {view.status.value}; its files come once it has succeeded.")
        stem = Path(view.slide_name).stem or "slide"
        return FileResponse(
            path,
            media_type="application/geo+json" if geojson else "text/csv",
            filename=f"{stem}.geojson" if geojson else f"{stem}.tiles.csv",
        )
