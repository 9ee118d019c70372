"""The API's answers held to its OpenAPI document: `CheckedClient` is a TestClient that checks every
answer under /api/v1 against the document the API serves, so each API test checks the bodies of the
answers it gets as well as what it asserts of them.

An answer's status must be one its operation documents, its content type the documented one, and a
JSON body must match the documented schema, read strictly: an object holds no field that its schema
does not name. An address or method the document does not have must be answered with an Error.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
from starlette.testclient import TestClient

PREFIX = "/api/v1"
UNDOCUMENTED = (PREFIX + "/openapi.json", PREFIX + "/docs")  # the document itself, and its page


def strict(schema: Any) -> Any:
    """`schema` with every object that names its properties closed to others."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@cache
def served_document() -> dict[str, Any]:
    """GET /api/v1/openapi.json of the API (the same for every install: fetched once)."""
    from starlette.applications import Starlette

    from core.api.routes import api_routes
    from core.config import load_settings

    client = TestClient(Starlette(routes=api_routes(load_settings())), client=("127.0.0.1", 50000))
    response = client.get(PREFIX + "/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
    return response.json()


@cache
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    """A validator of `schema_json`, a schema of the served document, read strictly."""
    defs = served_document()["components"]["schemas"]
    whole = json.dumps({**json.loads(schema_json), "$defs": defs}).replace("#/components/schemas/", "#/$defs/")
    return jsonschema.Draft202012Validator(strict(json.loads(whole)))


def operation_of(document: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    """The document's operation for `method` on `path` (under the prefix); None when it has none."""
    for template, item in document["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            return item.get(method.lower())
    return None


def check_answer(document: dict[str, Any], method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """AssertionError (or jsonschema's ValidationError) unless the answer is one the document describes."""
    operation = operation_of(document, method, path)
    if operation is None:  # no such address or method (or refused before it was looked for): an Error
        assert 400 <= status < 500 and content_type == "application/json", (method, path, status)
        schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
    else:
        response = operation["responses"].get(str(status))
        assert response is not None, f"{method} {path} answered {status}, which its operation does not document"
        media = content_type.split(";")[0].strip()
        assert media in response.get("content", {}), f"{method} {path} {status}: {media} is not documented"
        if media != "application/json":
            return
        schema = response["content"][media]["schema"]
    _validator(json.dumps(schema, sort_keys=True)).validate(json.loads(body))


class CheckedClient(TestClient):
    """A TestClient whose every answer under /api/v1 is checked against the API's OpenAPI document."""

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any):  # type: ignore[override]
        response = super().request(method, url, *args, **kwargs)
        path = response.request.url.path
        if path.startswith(PREFIX + "/") and path not in UNDOCUMENTED and response.status_code != 307:
            check_answer(
                served_document(),
                method,
                path[len(PREFIX) :],
                response.status_code,
                response.headers.get("content-type", ""),
                response.content,
            )
        return response
