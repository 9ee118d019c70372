"""The API's OpenAPI 3.1 document (GET /api/v1/openapi.json), written out by hand beside the routes
(core/api/routes.py), except the run settings' schema, which is made from RunConfig's fields so that
a new setting appears here as it does in the CLI and the Train form."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from core.inference.service import PREDICTION_FIELDS
from core.training.run_config import RunConfig, setting_type

VERSION = "1.0.0"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **more}


def _ok(schema: str, description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{status}"} for status in statuses}


ERRORS = {
    "400": "A body that is not application/json (multipart/form-data for /predict), a form that cannot be read, "
    "or a Host that is not in ALLOWED_HOSTS.",
    "401": "No API token, or a wrong or removed one, or an old one to be made again (WWW-Authenticate: Bearer).",
    "403": "The token's role may not do this (editors only; a viewer reads only their own predictions), "
    "AUTH_MODE=none and the client is not on the server's own machine, or the request comes from a web "
    "page of another origin (Origin not the app's own nor in ALLOWED_ORIGINS).",
    "404": "No run (or slide job) with this id, or no such address.",
    "409": "The slide job has not succeeded (yet), so it has no such file.",
    "413": "The body is larger than MAX_UPLOAD_MB (images) or 1 MB (JSON); refused before it is read when its "
    "Content-Length says so.",
    "422": "The request cannot be carried out as sent: not an image, too many pixels (MAX_IMAGE_PIXELS), "
    "unusable run settings, no approved model... The message says which.",
    "429": "Too many failed token attempts from this address; try again after Retry-After seconds.",
    "503": "The server's sign-in settings are broken (AUTH_MODE, the accounts file), or, for /predict, it is "
    "classifying as many requests as it takes at once (Retry-After).",
}


def run_config_schema() -> dict[str, Any]:
    """RunConfig as a JSON Schema: each field's type, default, choices and help."""
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        kind = _JSON_TYPES[setting_type(f)]
        prop: dict[str, Any] = {
            "type": [kind, "null"] if f.default is None else kind,
            "description": f.metadata.get("help") or f.metadata.get("internal", ""),
        }
        if f.name == "weights":
            prop["description"] += " (left out: the server's DEFAULT_WEIGHTS)"
        elif f.default is not dataclasses.MISSING:
            prop["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            prop["default"] = f.default_factory()
        if "choices" in f.metadata:
            prop["enum"] = list(f.metadata["choices"])
        if "bounds" in f.metadata:  # what RunConfig.validate holds a new run to
            prop["minimum"], prop["maximum"] = f.metadata["bounds"]
        if "pattern" in f.metadata:
            prop["pattern"] = f"^({f.metadata['pattern'][0]})$"
        properties[f.name] = prop
    return {"type": "object", "required": ["dataset"], "additionalProperties": False, "properties": properties}


def _schemas() -> dict[str, Any]:
    number_map = {"type": "object", "additionalProperties": {"type": "number"}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Health": {
            "type": "object",
            "required": ["status", "database", "worker"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "no worker", "unavailable"]},
                "database": {"type": "boolean"},
                "worker": _nullable("boolean", description="a worker is alive"),
                "queued": _nullable("integer"),
                "error": {"type": "string"},
            },
        },
        # One vocabulary for a prediction (core/inference/service.py PREDICTION_FIELDS): /predict answers
        # these, /predictions the same with when, who and through what, and so do the CSVs.
        "Prediction": {
            "type": "object",
            "required": list(PREDICTION_FIELDS),
            "properties": {
                "image_name": {"type": "string", "description": "the file's name as sent"},
                "image_sha256": {"type": "string", "description": "sha256 of the file's bytes"},
                "width": {"type": "integer", "description": "in pixels, as decoded"},
                "height": {"type": "integer"},
                "size_bytes": {"type": "integer", "description": "the file's size"},
                "predicted": {"type": "string", "description": "the class with the highest probability"},
                "probabilities": {**number_map, "description": "class -> probability, of probability_kind"},
                "probability_kind": {
                    "type": "string",
                    "enum": ["calibrated", "raw"],
                    "description": "calibrated (temperature-scaled on the run's validation images) or "
                    "raw, for a run without a validation part",
                },
                "refer": _nullable(
                    "boolean",
                    description="'uncertain, refer': the top probability is below "
                    "refer_threshold, or refer_threshold is null; null when the run "
                    "has no calibration (raw probabilities, no refer band)",
                ),
                "refer_threshold": _nullable(
                    "number",
                    description="the calibrated top probability below which a "
                    "prediction is referred. null with refer true: no threshold can promise "
                    "refer_target from the run's validation images, so every prediction is "
                    "referred; null with refer null: no refer band",
                ),
                "refer_target": _nullable(
                    "number",
                    description="the accuracy the predictions at or above "
                    "refer_threshold reach with 95% confidence (a lower bound on the run's "
                    "validation images); null without a refer band",
                ),
                "run_id": {"type": "integer", "description": "the run whose model classified it"},
                "model_sha256": {"type": "string", "description": "sha256 of that run's model file"},
            },
        },
        "PredictResponse": {
            "type": "object",
            "required": ["run_id", "model_sha256", "predictions"],
            "properties": {
                "run_id": {"type": "integer"},
                "model_sha256": {"type": "string"},
                "predictions": {"type": "array", "items": _ref("Prediction")},
            },
        },
        "Model": {
            "type": "object",
            "required": ["run_id", "classes", "model_sha256", "approved", "default"],
            "properties": {
                "run_id": {"type": "integer"},
                "label": {"type": "string"},
                "dataset": {"type": "string"},
                "classes": {"type": "array", "items": {"type": "string"}},
                "image_size": {"type": "integer"},
                "protocol": {"type": "string"},
                "leaky": {"type": "boolean"},
                "test_accuracy": _nullable("number"),
                "calibrated": {"type": "boolean"},
                "model_sha256": _nullable("string", description="sha256 of its model file"),
                "approved": {"type": "boolean", "description": "the approved model of its class set"},
                "default": {"type": "boolean", "description": "the model /predict uses when no run is named"},
                "finished_at": _nullable("string", format="date-time"),
            },
        },
        "Models": {"type": "object", "properties": {"models": {"type": "array", "items": _ref("Model")}}},
        "Run": {
            "type": "object",
            "required": ["id", "status", "dataset"],
            "properties": {
                "id": {"type": "integer"},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "label": {"type": "string"},
                "dataset": {"type": "string"},
                "classes": {"type": "array", "items": {"type": "string"}},
                "protocol": {"type": "string"},
                "leaky": {"type": "boolean"},
                "grouped": _nullable("boolean"),
                "experiment": {"type": "string"},
                "fold": {"type": "integer"},
                "seed": {"type": "integer"},
                "weights": {"type": "string"},
                "device": _nullable("string"),
                "created_at": {"type": "string", "format": "date-time"},
                "created_by": _nullable("string"),
                "started_at": _nullable("string", format="date-time"),
                "finished_at": _nullable("string", format="date-time"),
                "seconds": _nullable("number"),
                "epochs": {"type": "integer"},
                "epochs_done": {"type": "integer"},
                "progress": {
                    "type": "object",
                    "properties": {"fraction": {"type": "number"}, "text": {"type": "string"}},
                },
                "test_accuracy": _nullable("number"),
                "cancel_requested": {"type": "boolean"},
            },
        },
        "Runs": {"type": "object", "properties": {"runs": {"type": "array", "items": _ref("Run")}}},
        "RunDetail": {
            "allOf": [
                _ref("Run"),
                {
                    "type": "object",
                    "properties": {
                        "config": _ref("RunConfig"),
                        "summary": {"type": "object", "description": "what the run found out"},
                        "progress_detail": {"type": "object"},
                        "error": _nullable("string"),
                        "epoch_metrics": {"type": "array", "items": {"type": "object"}},
                        "report": _nullable(
                            "object", description="the test report: accuracy, per-class rows, confusion matrix"
                        ),
                        "uncertainty": _nullable("object"),
                        "model_file": {"type": "boolean"},
                    },
                },
            ]
        },
        "RunConfig": run_config_schema(),
        # POST /runs: the settings, and the person's own name and notes for the runs (as on the Train form).
        "RunRequest": {
            **run_config_schema(),
            "properties": {
                **run_config_schema()["properties"],
                "name": {
                    "type": "string",
                    "maxLength": 200,
                    "description": "the run's own name (k-fold folds share it)",
                },
                "notes": {"type": "string", "maxLength": 4000, "description": "what the run is for"},
            },
        },
        "QueuedRuns": {
            "type": "object",
            "required": ["run_ids", "runs"],
            "properties": {
                "run_ids": {"type": "array", "items": {"type": "integer"}},
                "runs": {"type": "array", "items": _ref("Run")},
            },
        },
        "LoggedPrediction": {
            "allOf": [
                {**_ref("Prediction")},
                {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "at": {"type": "string", "format": "date-time", "description": "UTC"},
                        "user": {"type": "string", "description": "who classified it"},
                        "source": {"type": "string", "enum": ["page", "api", "cli"]},
                    },
                },
            ]
        },
        "Predictions": {
            "type": "object",
            "properties": {"predictions": {"type": "array", "items": _ref("LoggedPrediction")}},
        },
        "SlideVerdict": {
            "type": "object",
            "description": "A whole slide's verdict: the mean of its tissue tiles' "
            "probabilities, referred by the run's band (chosen on its validation images, not on slides)",
            "properties": {
                "predicted": {"type": "string"},
                "probabilities": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "class -> probability, of probability_kind",
                },
                "probability_kind": {"type": "string", "enum": ["calibrated", "raw"]},
                "refer": _nullable("boolean", description="uncertain, refer; null: no calibration, so no band"),
                "refer_threshold": _nullable("number"),
                "refer_target": _nullable("number"),
                "tissue_share": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "class -> share of the tissue tiles predicted as it",
                },
                "tiles_kept": {"type": "integer"},
                "tile_px": {"type": "integer"},
                "tile_mpp": {"type": "number"},
                "seconds": {"type": "number"},
                "tiles_per_second": {"type": "number"},
                "slide_width": {"type": "integer"},
                "slide_height": {"type": "integer"},
                "slide_mpp": {"type": "number"},
            },
        },
        "SlideJob": {
            "type": "object",
            "required": ["id", "run_id", "status", "url"],
            "properties": {
                "id": {"type": "integer"},
                "run_id": {"type": "integer"},
                "slide_name": {"type": "string"},
                "user": {"type": "string"},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": _nullable("string", format="date-time"),
                "finished_at": _nullable("string", format="date-time"),
                "tiles_done": {"type": "integer"},
                "tiles_total": _nullable("integer", description="null until tiled"),
                "seconds_left": _nullable("number", description="at the rate so far"),
                "error": _nullable("string"),
                "verdict": {"oneOf": [_ref("SlideVerdict"), {"type": "null"}]},
                "url": {"type": "string"},
                "geojson_url": {"type": "string"},
                "tiles_csv_url": {"type": "string"},
            },
        },
    }


def _query(name: str, kind: str, description: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": kind, **more},
    }


def _paths() -> dict[str, Any]:
    secured = [{"bearer": []}]
    return {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Whether the database answers and a worker is alive",
                "security": [],
                "responses": {
                    **_ok("Health", "The database answers"),
                    "503": {
                        "description": "The database does not answer",
                        "content": {"application/json": {"schema": _ref("Health")}},
                    },
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/predict": {
            "post": {
                "operationId": "predict",
                "summary": "Classify images (logged as source 'api')",
                "security": secured,
                "parameters": [
                    _query("run", "integer", "the run whose model classifies (default: the approved model)")
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["images"],
                                "properties": {
                                    "images": {
                                        "type": "array",
                                        "items": {"type": "string", "contentMediaType": "application/octet-stream"},
                                        "description": "TIFF, PNG, JPEG or BMP files, one part each",
                                    },
                                    "run": {"type": "integer", "description": "as the query parameter"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    **_ok("PredictResponse", "Each image's answer, in the order sent"),
                    **_errors("400", "401", "403", "404", "413", "422", "429", "503"),
                },
            }
        },
        "/models": {
            "get": {
                "operationId": "models",
                "summary": "Succeeded runs whose model can classify",
                "security": secured,
                "responses": {**_ok("Models", "The models, newest first"), **_errors("401", "429", "503")},
            }
        },
        "/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "The runs, newest first",
                "security": secured,
                "parameters": [
                    _query(
                        "status",
                        "string",
                        "only runs in this status",
                        enum=["queued", "running", "succeeded", "failed", "cancelled"],
                    ),
                    _query("dataset", "string", "only runs of this dataset"),
                ],
                "responses": {**_ok("Runs", "The runs"), **_errors("401", "422", "429", "503")},
            },
            "post": {
                "operationId": "queueRun",
                "summary": "Queue a training run (one per fold for k-fold); editors",
                "security": secured,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RunRequest")}}},
                "responses": {
                    **_ok("QueuedRuns", "Queued; Location names the first run", "201"),
                    **_errors("400", "401", "403", "413", "422", "429", "503"),
                },
            },
        },
        "/runs/{run_id}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run: status, progress, settings, metrics, epochs",
                "security": secured,
                "parameters": [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {**_ok("RunDetail", "The run"), **_errors("401", "404", "429", "503")},
            }
        },
        "/predictions": {
            "get": {
                "operationId": "listPredictions",
                "summary": "The prediction log, newest first",
                "security": secured,
                "parameters": [
                    _query(
                        "since", "string", "at or after this time (ISO 8601; UTC without an offset)", format="date-time"
                    ),
                    _query("until", "string", "before this time", format="date-time"),
                    _query("run", "integer", "only this run's"),
                    _query("user", "string", "only this user's"),
                    _query("predicted", "string", "only this predicted class"),
                    _query("limit", "integer", "at most this many (default 1000)", minimum=1, maximum=10000),
                ],
                "responses": {
                    **_ok("Predictions", "The log (a viewer's: their own rows)"),
                    **_errors("401", "403", "422", "429", "503"),
                },
            }
        },
        "/slides": {
            "post": {
                "operationId": "queueSlide",
                "summary": "Classify a whole slide in the background (logged as 'api')",
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["slide"],
                                "properties": {
                                    "slide": {
                                        "type": "string",
                                        "contentMediaType": "application/octet-stream",
                                        "description": "an SVS, NDPI, SCN, BIF, CZI or pyramidal TIFF file",
                                    },
                                    "run": {
                                        "type": "integer",
                                        "description": "the run whose model classifies (default: approved)",
                                    },
                                    "mpp": {
                                        "type": "number",
                                        "description": "microns per pixel, for a slide whose file has none",
                                    },
                                },
                            }
                        },
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["path"],
                                "properties": {
                                    "path": {
                                        "type": "string",
                                        "description": "a slide on the server, under IMPORT_ROOTS",
                                    },
                                    "run": {"type": "integer"},
                                    "mpp": {"type": "number"},
                                },
                            }
                        },
                    },
                },
                "responses": {
                    **_ok("SlideJob", "Queued; Location names the job", "202"),
                    **_errors("400", "401", "403", "404", "413", "422", "429", "503"),
                },
            }
        },
        "/slides/{job_id}": {
            "get": {
                "operationId": "getSlide",
                "summary": "A slide job: progress, then the slide's verdict",
                "security": secured,
                "parameters": [_id("job_id")],
                "responses": {
                    **_ok("SlideJob", "The job (a viewer's own only)"),
                    **_errors("401", "404", "429", "503"),
                },
            }
        },
        "/slides/{job_id}/geojson": {
            "get": {
                "operationId": "getSlideGeojson",
                "summary": "One square per tile with its class, for QuPath",
                "security": secured,
                "parameters": [_id("job_id")],
                "responses": {
                    "200": {
                        "description": "GeoJSON FeatureCollection in level-0 pixels",
                        "content": {"application/geo+json": {"schema": {"type": "object"}}},
                    },
                    **_errors("401", "404", "409", "429", "503"),
                },
            }
        },
        "/slides/{job_id}/tiles.csv": {
            "get": {
                "operationId": "getSlideTiles",
                "summary": "One row per tile: position, class, probabilities",
                "security": secured,
                "parameters": [_id("job_id")],
                "responses": {
                    "200": {"description": "CSV", "content": {"text/csv": {"schema": {"type": "string"}}}},
                    **_errors("401", "404", "409", "429", "503"),
                },
            }
        },
    }


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "integer"}}


@cache
def document(prefix: str = "/api/v1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API mounted at `prefix`."""
    error = {"application/json": {"schema": _ref("Error")}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Lymphoma subtype recognition API",
            "version": VERSION,
            "description": "Classify H&E images, follow and queue training runs, read the prediction log. "
            "Bearer tokens come from `python -m core.access.accounts token add NAME --role "
            "viewer|editor`; with AUTH_MODE=none the API answers only on the server's own "
            "machine. A request that changes something sends application/json (images: "
            "multipart/form-data); one from a web page of another origin is refused. Every "
            'error is JSON {"error": message}.',
        },
        "servers": [{"url": prefix}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "lk_<id>_<secret>"}},
            "schemas": _schemas(),
            "responses": {status: {"description": text, "content": error} for status, text in ERRORS.items()},
        },
    }
