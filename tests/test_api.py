"""The HTTP API (core/api) through Starlette's TestClient on its routes, and once on the real server
(`streamlit run serve.py`) beside the pages: bearer tokens and roles, the JSON errors and their
codes, the limits on what a request may carry, the same answer for an image as the prediction
service gives, queueing a run, and an OpenAPI document that validates.

One tiny CPU run (32 px, one epoch, with a validation part so that it is calibrated) is trained once
for the module. START_WORKER=0 throughout: a queued run stays queued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import urllib.error
import urllib.request

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.__main__ import main as core_main
from core.access import accounts, tokens
from core.access.accounts import EDITOR, VIEWER, User
from core.api.routes import api_routes
from core.config import Settings, load_settings
from core.inference import approval, service
from core.store.db import Run, RunStatus, Worker
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.run_config import RunConfig
from tests.openapi_check import CheckedClient
from tests.server import free_port, start_app, stop_app, wait_healthy
from tests.synthetic import ingest_synthetic, synthetic_image, train_runs

# The smallest run with training, validation and test images (as tests/test_model_file.py's).
TINY = dict(
    image_size=32, epochs=1, per_class=4, batch_size=12, lr=1e-3, weights="none", device="cpu", val_fraction=0.25
)


@dataclasses.dataclass
class Served:
    settings: Settings
    run_id: int
    viewer: str  # tokens
    editor: str

    def client(self, address: str = "203.0.113.5", **changes) -> TestClient:
        """A client of the API's routes alone (no Streamlit), from `address`, with settings `changes`."""
        app = Starlette(routes=api_routes(dataclasses.replace(self.settings, **changes)))
        return CheckedClient(app, client=(address, 40000))  # each answer held to the OpenAPI document

    def as_(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    tmp = tmp_path_factory.mktemp("api")
    home = tmp / "home"
    settings = load_settings({"APP_HOME": str(home), "AUTH_MODE": "password", "START_WORKER": "0"})
    Session = make_sessionmaker(settings.database_url)
    ingest_synthetic(tmp / "src", settings, Session, per_class=5)
    (run_id,) = train_runs(Session, settings, RunConfig(dataset="synthetic", **TINY))
    _, viewer = tokens.add_token(settings.accounts_file, "vera", VIEWER)
    _, editor = tokens.add_token(settings.accounts_file, "ed", EDITOR)
    return Served(settings, run_id, viewer, editor)


def png(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def error_of(response) -> str:
    """The message of a JSON error answer (and that it is one)."""
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Tokens


def test_token_cli_prints_the_token_once_and_keeps_only_its_sha256(tmp_path, capsys):
    path = tmp_path / "accounts.toml"
    assert core_main(["token", "--file", str(path), "add", "ci", "--role", "viewer"]) == 0
    token = capsys.readouterr().out.strip()
    token_id, secret = tokens.split_token(token)
    text = path.read_text()
    # The record keeps the secret's SHA-256 digest: not the token, not a slow argon2 hash.
    stored = accounts.load_accounts(path).tokens[token_id].secret_hash
    assert stored == "sha256:" + hashlib.sha256(secret.encode()).hexdigest() and f'"{stored}"' in text
    assert secret not in text and "$argon2" not in text
    assert tokens.token_user(accounts.load_accounts(path), token) == User("ci", VIEWER)
    assert tokens.token_user(accounts.load_accounts(path), token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert core_main(["token", "--file", str(path), "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith(f"{token_id}\tci\tviewer\t") and secret not in listed
    assert core_main(["token", "--file", str(path), "remove", token_id]) == 0
    assert not accounts.load_accounts(path).tokens


def test_no_token_or_a_wrong_one_is_401_and_a_removed_one_is_refused_at_once(served):
    client = served.client()
    response = client.get("/api/v1/runs")
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in error_of(response)
    assert client.get("/api/v1/runs", headers=served.as_("not-a-token")).status_code == 401
    wrong = served.viewer[:-4] + ("AAAA" if not served.viewer.endswith("AAAA") else "BBBB")
    assert client.get("/api/v1/runs", headers=served.as_(wrong)).status_code == 401

    record, token = tokens.add_token(served.settings.accounts_file, "temp", VIEWER)
    assert client.get("/api/v1/runs", headers=served.as_(token)).status_code == 200
    tokens.remove_token(served.settings.accounts_file, record.id)
    assert client.get("/api/v1/runs", headers=served.as_(token)).status_code == 401


def test_failed_token_attempts_are_throttled_per_address_and_the_right_token_never_is(served):
    client = served.client("198.51.100.7")
    wrong = served.editor[:-4] + ("AAAA" if not served.editor.endswith("AAAA") else "BBBB")
    codes = [client.get("/api/v1/runs", headers=served.as_(wrong)).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    refused = client.get("/api/v1/runs", headers=served.as_(wrong))
    assert refused.status_code == 429 and "Too many" in error_of(refused) and int(refused.headers["retry-after"]) > 0
    # The right token is checked first: 256 random bits are not guessed, so it is never refused.
    assert client.get("/api/v1/runs", headers=served.as_(served.editor)).status_code == 200
    assert served.client("198.51.100.8").get("/api/v1/runs", headers=served.as_(served.editor)).status_code == 200


def test_with_auth_mode_none_only_the_servers_own_machine_is_answered_as_the_local_editor(served):
    for address in ("127.0.0.1", "::1"):
        assert served.client(address, auth_mode="none").get("/api/v1/runs").status_code == 200
    response = served.client("192.0.2.10", auth_mode="none").get("/api/v1/runs")
    assert response.status_code == 403 and "AUTH_MODE is none" in error_of(response)


# ---------------------------------------------------------------------------------------------
# Predicting


def test_a_viewer_predicts_and_gets_what_the_prediction_service_gives(served):
    data = png(synthetic_image("FL", 500, (80, 60)))
    client = served.client()
    response = client.post(
        "/api/v1/predict",
        params={"run": served.run_id},
        headers=served.as_(served.viewer),
        files=[("images", ("new-FL.png", data, "image/png"))],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    (answer,) = body["predictions"]
    Session = make_sessionmaker(served.settings.database_url)
    (expected,) = service.classify(
        Session,
        served.settings,
        User("vera", VIEWER),
        [service.ImageInput("new-FL.png", data)],
        run_id=served.run_id,
        source="api",
        log=False,
    )
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-9)
    assert answer["predicted"] == expected.predicted == max(expected.probabilities, key=expected.probabilities.get)
    assert (answer["probability_kind"], answer["refer"], answer["refer_threshold"], answer["refer_target"]) == (
        "calibrated",
        expected.refer,
        expected.threshold,
        0.9,
    )
    model_sha = hashlib.sha256(model_path(served.settings, served.run_id).read_bytes()).hexdigest()
    assert answer["model_sha256"] == body["model_sha256"] == model_sha and body["run_id"] == served.run_id
    assert answer["image_sha256"] == hashlib.sha256(data).hexdigest() and answer["image_name"] == "new-FL.png"
    assert (answer["width"], answer["height"], answer["size_bytes"]) == (80, 60, len(data))

    logged = client.get(
        "/api/v1/predictions", params={"run": served.run_id, "user": "vera"}, headers=served.as_(served.viewer)
    ).json()["predictions"]
    assert [(p["source"], p["image_sha256"], p["predicted"]) for p in logged] == [
        ("api", answer["image_sha256"], answer["predicted"])
    ]
    # One vocabulary: the log's row is the answer, field for field, with when, who and through what.
    (row,) = logged
    assert set(answer) == set(service.PREDICTION_FIELDS) and set(row) == set(answer) | {"id", "at", "user", "source"}
    assert {k: row[k] for k in answer if k != "probabilities"} == {
        k: v for k, v in answer.items() if k != "probabilities"
    }
    # Both answers hold to the OpenAPI document's schemas.
    import jsonschema

    document = client.get("/api/v1/openapi.json").json()
    resolver = {"$defs": document["components"]["schemas"]}
    for value, name in ((body, "PredictResponse"), ({"predictions": logged}, "Predictions")):
        schema = {**document["components"]["schemas"][name], **resolver}
        jsonschema.validate(value, json.loads(json.dumps(schema).replace("#/components/schemas/", "#/$defs/")))


def test_without_a_run_the_approved_model_classifies(served):
    client = served.client()
    files = [("images", ("a.png", png(synthetic_image("CLL", 501)), "image/png"))]
    models = client.get("/api/v1/models", headers=served.as_(served.viewer)).json()["models"]
    assert [(m["run_id"], m["approved"], m["default"], m["calibrated"]) for m in models] == [
        (served.run_id, False, False, True)
    ]
    refused = client.post("/api/v1/predict", headers=served.as_(served.viewer), files=files)
    assert refused.status_code == 422 and "No model is approved" in error_of(refused)
    assert (
        client.post("/api/v1/predict", params={"run": 999}, headers=served.as_(served.viewer), files=files).status_code
        == 404
    )

    Session = make_sessionmaker(served.settings.database_url)
    with Session.begin() as s:
        approval.approve(s, served.settings, served.run_id, User("ed", EDITOR), "for the tests")
    try:
        models = client.get("/api/v1/models", headers=served.as_(served.viewer)).json()["models"]
        assert [(m["run_id"], m["approved"], m["default"]) for m in models] == [(served.run_id, True, True)]
        response = client.post("/api/v1/predict", headers=served.as_(served.viewer), files=files)
        assert response.status_code == 200 and response.json()["run_id"] == served.run_id
    finally:  # the module's server is shared: the next test finds no approved model, whatever the order
        with Session.begin() as s:
            approval.withdraw(s, served.run_id, User("ed", EDITOR))


def test_a_huge_image_a_text_file_and_a_body_past_the_limit_are_refused(served):
    client = served.client()
    # 12,000 x 12,000 px of one colour: 144 MP, over MAX_IMAGE_PIXELS, in a file of a few kB.
    bomb = png(PILImage.new("1", (12_000, 12_000)))
    assert len(bomb) < 100_000
    for name, data in (("bomb.png", bomb), ("notes.txt", b"not an image at all")):
        response = client.post(
            "/api/v1/predict",
            params={"run": served.run_id},
            headers=served.as_(served.viewer),
            files=[("images", (name, data))],
        )
        assert response.status_code == 422 and name in error_of(response)
    no_images = client.post("/api/v1/predict", headers=served.as_(served.viewer), files={"run": (None, "1")})
    assert no_images.status_code == 422 and "one or more images" in error_of(no_images)
    as_form = client.post("/api/v1/predict", headers=served.as_(served.viewer), data={"run": "1"})  # urlencoded
    assert as_form.status_code == 400 and "multipart/form-data" in error_of(as_form)

    small = served.client(max_upload_mb=0.01)  # about 10 kB
    big = os.urandom(20_000)
    declared = small.post("/api/v1/predict", headers=served.as_(served.viewer), files=[("images", ("x.png", big))])
    assert declared.status_code == 413 and "MAX_UPLOAD_MB" in error_of(declared)
    # No Content-Length (sent in chunks): counted as it arrives.
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n\r\n'.encode(),
        big,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    chunked = small.post(
        "/api/v1/predict",
        content=iter(parts),
        headers={**served.as_(served.viewer), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert chunked.status_code == 413 and "MAX_UPLOAD_MB" in error_of(chunked)


# ---------------------------------------------------------------------------------------------
# Runs


def test_runs_and_one_run_with_its_metrics(served):
    client = served.client()
    runs = client.get("/api/v1/runs", params={"status": "succeeded"}, headers=served.as_(served.viewer)).json()["runs"]
    assert [(r["id"], r["status"], r["dataset"]) for r in runs] == [(served.run_id, "succeeded", "synthetic")]
    detail = client.get(f"/api/v1/runs/{served.run_id}", headers=served.as_(served.viewer)).json()
    Session = make_sessionmaker(served.settings.database_url)
    with Session() as s:
        run = s.get(Run, served.run_id)
        assert detail["summary"]["test_accuracy"] == run.summary["test_accuracy"]
    assert detail["report"]["accuracy"] == pytest.approx(run.summary["test_accuracy"])
    assert detail["config"]["image_size"] == 32 and len(detail["epoch_metrics"]) == 1
    assert detail["progress"]["fraction"] == 1.0 and detail["model_file"] is True
    missing = client.get("/api/v1/runs/999", headers=served.as_(served.viewer))
    assert missing.status_code == 404 and "No run with id 999" in error_of(missing)
    assert client.get("/api/v1/runs", params={"status": "done"}, headers=served.as_(served.viewer)).status_code == 422
    assert error_of(client.get("/api/v1/nothing-here"))


def test_a_viewer_cannot_queue_a_run_and_an_editor_queues_one(served):
    client = served.client()
    config = {"dataset": "synthetic", "epochs": 2, "image_size": 32, "weights": "none", "device": "cpu"}
    refused = client.post("/api/v1/runs", json=config, headers=served.as_(served.viewer))
    assert refused.status_code == 403 and "only editors" in error_of(refused)
    for bad, message in (
        ({**config, "epochs": "two"}, "'epochs' must be a whole number"),
        ({**config, "colour": "red"}, "Unknown run setting(s) colour"),
        ({**config, "dataset": "nowhere"}, "nowhere"),
        ({**config, "split": "random"}, "Unknown split"),
    ):
        response = client.post("/api/v1/runs", json=bad, headers=served.as_(served.editor))
        assert response.status_code == 422 and message in error_of(response)

    # Without the server's ImageNet weights, the refusal speaks the API's words (a field), not flags.
    offline = client.post("/api/v1/runs", json={**config, "weights": "imagenet"}, headers=served.as_(served.editor))
    assert offline.status_code == 422 and '"weights": "none"' in error_of(offline)
    assert "--weights" not in error_of(offline) and "No run was queued" in error_of(offline)
    named = {**config, "name": "March check", "notes": "Same specimens as run 1."}  # as the Train form takes them
    response = client.post("/api/v1/runs", json=named, headers=served.as_(served.editor))
    assert response.status_code == 201, response.text
    (run_id,) = response.json()["run_ids"]
    assert response.headers["location"] == f"/api/v1/runs/{run_id}"
    Session = make_sessionmaker(served.settings.database_url)
    with Session() as s:
        run = s.get(Run, run_id)
        assert (run.status, run.created_by, run.config["epochs"]) == (RunStatus.queued, "ed", 2)
        assert (run.name, run.notes) == ("March check", "Same specimens as run 1.")
        assert not s.scalars(select(Worker)).all()  # START_WORKER=0: nothing trains it here
    queued = client.get(f"/api/v1/runs/{run_id}", headers=served.as_(served.viewer)).json()
    assert queued["status"] == "queued" and queued["progress"]["text"].startswith("Queued")


def test_health_needs_no_token_and_the_openapi_document_validates(served):
    from openapi_spec_validator import validate

    client = served.client()
    health = client.get("/api/v1/health").json()
    assert health == {"status": "no worker", "database": True, "worker": False, "queued": health["queued"]}
    document = client.get("/api/v1/openapi.json").json()
    validate(document)
    # FastAPI writes the document from the routes: every address of the API is in it, and nothing else.
    assert set(document["paths"]) == {
        "/health",
        "/predict",
        "/models",
        "/runs",
        "/runs/{run_id}",
        "/predictions",
        "/models/{run_id}/field",
        "/reviews/queue",
        "/reviews",
        "/slides",
        "/slides/{job_id}",
        "/slides/{job_id}/geojson",
        "/slides/{job_id}/tiles.csv",
    }
    assert set(document["components"]["schemas"]["RunConfig"]["properties"]) == {
        f.name for f in dataclasses.fields(RunConfig)
    }


# ---------------------------------------------------------------------------------------------
# The real server


def test_the_server_serves_the_pages_and_the_api_on_one_port(served, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(APP_HOME=str(served.settings.app_home), AUTH_MODE="password", START_WORKER="0")
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "streamlit.log", "wb") as log:
        process = start_app(int(url.rsplit(":", 1)[1]), env, log)
        try:
            wait_healthy(url, process, log=tmp_path / "streamlit.log")
            with urllib.request.urlopen(url + "/api/v1/health") as r:
                assert r.status == 200 and b'"database":true' in r.read()
            request = urllib.request.Request(url + "/api/v1/runs", headers=served.as_(served.viewer))
            with urllib.request.urlopen(request) as r:
                assert r.status == 200 and r.headers.get("set-cookie") is None  # no browser cookie for the API
                assert served.run_id in [run["id"] for run in json.load(r)["runs"]]
            with urllib.request.urlopen(url + "/") as r:
                assert r.status == 200 and b"<html" in r.read().lower()
                assert r.headers["content-security-policy"] == "frame-ancestors 'self'"
                assert r.headers["x-frame-options"] == "SAMEORIGIN" and r.headers["x-content-type-options"] == "nosniff"
            # A page whose host name was pointed at this machine (DNS rebinding) reaches neither the pages,
            # their websocket, nor the API.
            for path in ("/", "/api/v1/health"):
                foreign = urllib.request.Request(url + path, headers={"Host": "rebound.example:8501"})
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(foreign)
                assert refused.value.code == 400 and b"ALLOWED_HOSTS" in refused.value.read()
            from websockets.exceptions import InvalidStatus
            from websockets.sync.client import connect

            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            with pytest.raises(InvalidStatus) as refused:  # the browser's Host is the name in the page's address
                connect(
                    "ws://rebound.example:8501/_stcore/stream", sock=sock, subprotocols=["streamlit"], open_timeout=30
                )
            assert refused.value.response.status_code == 403
        finally:
            stop_app(process)
