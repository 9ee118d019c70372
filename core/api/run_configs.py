"""A RunConfig from a JSON object (POST /runs): the fields the CLI and the Train form offer, each
checked against its type before RunConfig checks its value (RunConfig.validate: the bounds, choices
and patterns that the form and the flags are made from), so that a value the form would not offer is
a 422 that names the field rather than a run queued to fail, or to hold a GPU for ever."""

from __future__ import annotations

import dataclasses
from typing import Any

from core.api.errors import ApiError
from core.config import Settings
from core.errors import UserError
from core.training.run_config import RunConfig, setting_type

_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "an object"}


def _checked(name: str, kind: type, value: Any, optional: bool) -> Any:
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ApiError(422, f"Run setting '{name}' must be {_TYPE_WORDS[kind]}, not {value!r}.")
    return value


RUN_WORDS = ("name", "notes")  # the person's own words for a run, beside its settings (as on the Train form)


def run_words(data: Any) -> tuple[str | None, str | None]:
    """The `name` and `notes` of a POST /runs body (each a string or left out); taken out of `data`."""
    if not isinstance(data, dict):
        return None, None
    words = []
    for key in RUN_WORDS:
        value = data.pop(key, None)
        if value is not None and not isinstance(value, str):
            raise ApiError(422, f"'{key}' must be a string, not {value!r}.")
        words.append(value)
    return words[0], words[1]


def config_from_json(data: Any, settings: Settings) -> RunConfig:
    """The RunConfig of `data`; fields it leaves out take their defaults (weights: DEFAULT_WEIGHTS,
    as on the command line). ApiError 422 for anything RunConfig or its validate() would refuse."""
    if not isinstance(data, dict):
        raise ApiError(
            422,
            'The body must be a JSON object of run settings, e.g. {"dataset": "lymphoma", '
            '"epochs": 25}; GET the API\'s openapi.json for them all.',
        )
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ApiError(422, f"Unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}.")
    if "dataset" not in data:
        raise ApiError(422, "Run setting 'dataset' is required: the name of an ingested dataset.")
    values = {"weights": settings.default_weights, **data}
    for name, value in values.items():
        optional = fields[name].default is None
        values[name] = _checked(name, setting_type(fields[name]), value, optional)
    try:
        return RunConfig.from_dict(values).validate()
    except UserError as e:
        raise ApiError(422, str(e)) from None
    except (TypeError, ValueError) as e:  # a value of the right type that a check further in refuses
        raise ApiError(422, f"These run settings are not usable: {e}.") from None
