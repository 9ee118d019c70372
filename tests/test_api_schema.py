"""The API's OpenAPI document, written by FastAPI from the endpoints and their pydantic models: served
with its interactive page, holding the run settings made from RunConfig's fields, and describing the
answers the API really gives (tests/openapi_check.py holds every answer of the API tests to it; here,
FastAPI's own refusals, which must come in the API's error shape, and the checker itself).

No run is trained and nothing is ingested: AUTH_MODE=none on 127.0.0.1 over an empty install.
"""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.api import handlers
from core.api.routes import api_routes
from core.config import Settings
from core.training.run_config import RunConfig
from tests.openapi_check import CheckedClient, check_answer, served_document


def client(settings: Settings, prefix: str = "/api/v1", **changes) -> CheckedClient:
    app = Starlette(routes=api_routes(dataclasses.replace(settings, **changes), prefix=prefix))
    return CheckedClient(app, client=("127.0.0.1", 50000))


def test_the_document_is_served_with_its_interactive_page(settings):
    document = client(settings).get("/api/v1/openapi.json").json()  # validated in tests/test_api.py
    assert document["openapi"].startswith("3.1") and document["servers"] == [{"url": "/api/v1"}]
    assert document["info"]["title"] == "Lymphoma subtype recognition API" and document["info"]["version"]
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "lk_<id>_<secret>",
        "description": "An API token: `python -m core token add NAME --role viewer`.",
    }
    operations = {f"{m.upper()} {p}": op for p, item in document["paths"].items() for m, op in item.items()}
    assert len(operations) == 14
    assert all(op["security"] == [{"bearer": []}] for name, op in operations.items() if name != "GET /health")
    # Every refusal is an Error: FastAPI's own shape of a validation error is nowhere in the document.
    assert "HTTPValidationError" not in str(document) and "ValidationError" not in document["components"]["schemas"]
    assert operations["GET /runs/{run_id}"]["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    # POST /runs takes RunConfig's fields (made from the dataclass), and the run's name and notes.
    request = operations["POST /runs"]["requestBody"]["content"]["application/json"]["schema"]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(request["properties"]) == fields | {"name", "notes"} and request["required"] == ["dataset"]
    assert request["additionalProperties"] is False and "default" not in request["properties"]["weights"]
    assert request["properties"]["image_size"]["minimum"] == 32 and "enum" in request["properties"]["split"]

    page = client(settings).get("/api/v1/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text and "'/api/v1/openapi.json'" in page.text
    # Under server.baseUrlPath, the page asks for the document where it is.
    elsewhere = client(settings, prefix="/lab/api/v1").get("/lab/api/v1/docs")
    assert elsewhere.status_code == 200 and "'/lab/api/v1/openapi.json'" in elsewhere.text
    # The page's script and styles come from this server, not from another site.
    assert "http" not in page.text.split("<body>")[-1].replace("https://swagger.io", "")
    assert 'src="/lab/api/v1/docs-files/swagger-ui-bundle.js"' in elsewhere.text
    plain = TestClient(Starlette(routes=api_routes(settings)))  # a file, not an answer the document describes
    script = plain.get("/api/v1/docs-files/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text


def test_fastapis_own_refusals_come_in_the_apis_error_shape(settings, monkeypatch, caplog):
    c = client(settings, auth_mode="none")  # each answer is checked against the document as it comes
    refusals = {
        c.get("/api/v1/runs", params={"status": "done"}): (422, "'status' must be one of queued, running"),
        c.get("/api/v1/predictions", params={"limit": "many"}): (422, "'limit' must be a whole number, not 'many'"),
        c.get("/api/v1/predictions", params={"limit": "0"}): (422, "'limit' must be a whole number from 1 to 10000"),
        c.get("/api/v1/predictions", params={"since": "yesterday"}): (422, "'since' must be an ISO 8601 time"),
        c.get(f"/api/v1/runs/{2**63}"): (404, f"No run with id {2**63}."),
        c.get(f"/api/v1/slides/{2**63}/geojson"): (404, f"No slide job with id {2**63}."),
        c.get("/api/v1/runs/abc"): (404, "No such address in the API"),
        c.request("DELETE", "/api/v1/runs", json={}): (405, "Method Not Allowed"),
    }
    for response, (status, words) in refusals.items():
        assert response.status_code == status, (response.request.url, response.text)
        assert set(response.json()) == {"error"} and words in response.json()["error"], response.text
    assert c.get("/api/v1/predictions", params={"limit": "", "run": ""}).json() == {"predictions": []}
    assert c.get("/api/v1/runs", params={"status": "queued"}).json() == {"runs": []}

    # Who is asking comes first, as before: no token is a 401 whatever the parameters.
    assert client(settings, auth_mode="password").get("/api/v1/runs", params={"status": "done"}).status_code == 401

    # A failure of the server's own is a logged 500 with a JSON message, no traceback.
    monkeypatch.setattr(handlers.Api, "runs", lambda self, status, dataset: 1 / 0)
    failed = c.get("/api/v1/runs")
    assert failed.status_code == 500 and failed.json() == {
        "error": "The server failed to answer this request; its log has the details."
    }
    assert "ZeroDivisionError" in caplog.text and "Traceback" not in failed.text


def test_the_checker_refuses_answers_the_document_does_not_describe():
    document = served_document()
    health = {"status": "ok", "database": True, "worker": False, "queued": 0}
    check_answer(document, "GET", "/health", 200, "application/json", json.dumps(health).encode())  # passes
    for status, body in (
        (200, b'{"status": "fine", "database": true, "worker": false}'),  # not one of its values
        (200, b'{"status": "ok", "database": true, "worker": false, "extra": 1}'),  # a field it does not name
        (201, b'{"status": "ok", "database": true, "worker": false}'),  # a status it does not document
        (401, b'{"detail": "Not authenticated"}'),  # not an Error
    ):
        with pytest.raises((AssertionError, jsonschema.ValidationError)):
            check_answer(document, "GET", "/health" if status != 401 else "/runs", status, "application/json", body)
