"""RunConfig in the API: the pydantic models of its settings, made from RunConfig's own fields (so a new
setting appears in POST /runs, the run's `config` and the OpenAPI document as it does in the CLI and the
Train form), and a RunConfig from a POST /runs body.

A body is checked in two steps. The `RunRequest` model takes only known settings, each of its own type
(strictly: no "25" for 25, no 1 for true); then RunConfig.validate checks the values against the same
metadata the form and the flags are made from (bounds, choices, patterns). So a value the form would
not offer is a 422 that names the setting, rather than a run queued to fail, or to hold a GPU for ever.
The bounds, choices and patterns are in the schema for clients to read, but RunConfig.validate is the
one that enforces them, in the words the command line and the page use too."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from core.api.errors import ApiError
from core.config import Settings
from core.errors import UserError
from core.jobs.runs import MAX_NOTES
from core.store.db import NAME_LENGTH
from core.training.run_config import RunConfig, setting_type

_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "an object"}
RUN_WORDS = ("name", "notes")  # the person's own words for a run, beside its settings (as on the Train form)


def _schema_of(f: dataclasses.Field) -> dict[str, Any]:
    """What the schema says of `f` beyond its type: the rules RunConfig.validate holds a new run to."""
    meta, extra = f.metadata, {}
    if "choices" in meta:
        extra["enum"] = list(meta["choices"])
    if "bounds" in meta:
        extra["minimum"], extra["maximum"] = meta["bounds"]
    if "pattern" in meta:
        extra["pattern"] = f"^({meta['pattern'][0]})$"
    return extra


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _setting_field(f: dataclasses.Field, request: bool) -> tuple[Any, Any]:
    """(annotation, Field) of RunConfig's field `f`; in a request, `weights` left out is the server's
    DEFAULT_WEIGHTS (as on the command line), so the schema gives it no default."""
    kind = setting_type(f)
    annotation: Any = dict[str, Any] if kind is dict else kind
    if f.default is None:
        annotation = annotation | None
    description = f.metadata.get("help") or f.metadata.get("internal", "")
    extra = _schema_of(f)
    if f.default is not dataclasses.MISSING:
        default: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = ...  # required: the dataset
    if request and f.name == "weights":
        description += " (left out: the server's DEFAULT_WEIGHTS)"
        return annotation, Field(
            None, description=description, json_schema_extra=lambda s: (s.update(extra), _no_default(s))
        )
    return annotation, Field(default, description=description, json_schema_extra=extra or None)


def _settings_model(title: str, request: bool, doc: str, more: dict[str, Any] | None = None) -> type[BaseModel]:
    """A model of RunConfig's fields (and `more`): strict, and refusing fields it does not know."""
    fields = {f.name: _setting_field(f, request) for f in dataclasses.fields(RunConfig)}
    config = ConfigDict(strict=True, extra="forbid", title=title)
    return create_model(title, __config__=config, __doc__=doc, **fields, **(more or {}))


RunConfigModel = _settings_model("RunConfig", False, "A run's settings (core/training/run_config.py RunConfig).")
RunRequest = _settings_model(
    "RunRequest",
    True,
    "POST /runs: the run's settings (those left out take their defaults), and the person's own name and notes.",
    {  # the person's own words, checked by create_runs as the Train form's are
        "name": (
            str | None,
            Field(
                None,
                description="the run's own name (k-fold folds share it)",
                json_schema_extra={"maxLength": NAME_LENGTH},
            ),
        ),
        "notes": (
            str | None,
            Field(None, description="what the run is for", json_schema_extra={"maxLength": MAX_NOTES}),
        ),
    },
)


def run_request(data: Any, settings: Settings) -> tuple[RunConfig, str | None, str | None]:
    """The RunConfig of a POST /runs body `data`, and the run's name and notes; fields it leaves out take
    their defaults (weights: DEFAULT_WEIGHTS). ApiError 422 for anything RunRequest or
    RunConfig.validate would refuse, naming the setting."""
    if not isinstance(data, dict):
        raise ApiError(
            422,
            'The body must be a JSON object of run settings, e.g. {"dataset": "lymphoma", '
            '"epochs": 25}; GET the API\'s openapi.json for them all.',
        )
    try:
        request = RunRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, _refusal(e, data)) from None
    values = request.model_dump(exclude_unset=True)
    name, notes = (values.pop(key, None) for key in RUN_WORDS)
    try:
        return RunConfig.from_dict({"weights": settings.default_weights, **values}).validate(), name, notes
    except UserError as e:
        raise ApiError(422, str(e)) from None
    except (TypeError, ValueError) as e:  # a value of the right type that a check further in refuses
        raise ApiError(422, f"These run settings are not usable: {e}.") from None


def _refusal(error: ValidationError, data: dict) -> str:
    """The first thing wrong with `data`, in words: unknown settings, then a missing dataset, then the
    first setting (in RunConfig's order) of the wrong type."""
    problems = error.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(RunConfig))
        return f"Unknown run setting(s) {', '.join(unknown)}; known: {', '.join(known)}."
    if any(p["type"] == "missing" for p in problems):
        return "Run setting 'dataset' is required: the name of an ingested dataset."
    name = str(problems[0]["loc"][0])
    if name in RUN_WORDS:
        return f"'{name}' must be a string, not {data[name]!r}."
    kind = setting_type(next(f for f in dataclasses.fields(RunConfig) if f.name == name))
    return f"Run setting '{name}' must be {_TYPE_WORDS[kind]}, not {data[name]!r}."
