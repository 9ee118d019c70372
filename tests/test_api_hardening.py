"""What the server refuses before it acts, through serve.py's own middleware and the API's routes in
process (Starlette's TestClient): a foreign Host (DNS rebinding), a web page of another site (Origin,
Sec-Fetch-Site) or a body no program of ours sends (text/plain), the headers that keep other sites
from framing the app, run settings out of the form's bounds, values that used to be a 500, API tokens
that others have guessed at, who reads which rows of the prediction log, and a hash cache that holds
every model file.

No run is trained here: a dataset of a few synthetic images is enough for a run to be queued, which
shows that what is refused would otherwise have been carried out. START_WORKER=0: nothing trains.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from core.__main__ import main as core_main
from core.access import accounts, tokens
from core.access.accounts import EDITOR, VIEWER, ApiToken, User
from core.access.throttle import Limit, SignInThrottle
from core.api.auth import Authenticator
from core.api.errors import ApiError
from core.api.routes import api_routes
from core.api.site import host_allowed
from core.config import Settings, load_settings
from core.inference import approval, prediction_log
from core.jobs import views
from core.store.db import Run
from core.store.engine import make_sessionmaker
from tests.openapi_check import CheckedClient
from tests.synthetic import ingest_synthetic

APP = "http://localhost:8501"  # where the local user's browser has the app
RUN = {"dataset": "synthetic", "epochs": 1, "image_size": 32, "weights": "none", "device": "cpu"}
FRAME_HEADERS = {
    "content-security-policy": "frame-ancestors 'self'",
    "x-frame-options": "SAMEORIGIN",
    "x-content-type-options": "nosniff",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Settings:
    """AUTH_MODE=none (the local editor, on 127.0.0.1) over a dataset of 15 images."""
    tmp = tmp_path_factory.mktemp("hardening")
    settings = load_settings({"APP_HOME": str(tmp / "home"), "START_WORKER": "0"})
    ingest_synthetic(tmp / "src", settings, make_sessionmaker(settings.database_url), per_class=5)
    return settings


def runs_count(settings: Settings) -> int:
    with make_sessionmaker(settings.database_url)() as s:
        return s.scalar(select(func.count()).select_from(Run))


async def page(request) -> HTMLResponse:
    return HTMLResponse("<html>the app</html>")


async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def served(settings: Settings, monkeypatch, **env: str) -> TestClient:
    """serve.py's middleware (SiteGuard, then the gate) in front of the API, a page and a websocket, as
    `streamlit run serve.py` puts them in front of Streamlit's routes; reached at APP from 127.0.0.1.
    The middleware reads its settings from the environment (`env`), as on the server."""
    for name, value in {"APP_HOME": str(settings.app_home), **env}.items():
        monkeypatch.setenv(name, value)
    import serve

    routes = [*api_routes(settings), Route("/", page), WebSocketRoute("/_stcore/stream", stream)]
    app = Starlette(routes=routes, middleware=serve.MIDDLEWARE)
    return CheckedClient(app, base_url=APP, client=("127.0.0.1", 50000))  # answers held to the OpenAPI document


# ---------------------------------------------------------------------------------------------
# Host, Origin, Content-Type: serve.py's middleware and the API's guard


def test_a_cross_origin_text_plain_post_and_a_foreign_host_are_refused_and_queue_nothing(home, monkeypatch):
    client = served(home, monkeypatch)
    body = json.dumps(RUN)
    refused = {
        "a page of another site, as text/plain (no preflight)": client.post(
            "/api/v1/runs", content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}
        ),
        "a page of another site, even as JSON": client.post(
            "/api/v1/runs", content=body, headers={"Content-Type": "application/json", "Origin": "http://evil.example"}
        ),
        "a sandboxed page (Origin: null)": client.post(
            "/api/v1/runs", content=body, headers={"Content-Type": "application/json", "Origin": "null"}
        ),
        "another site that leaves Origin out": client.post(
            "/api/v1/runs", content=body, headers={"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}
        ),
        "text/plain with no Origin": client.post("/api/v1/runs", content=body, headers={"Content-Type": "text/plain"}),
        "a form": client.post("/api/v1/runs", data={"dataset": "synthetic"}),
        "a rebound host name": client.post(
            "/api/v1/runs", content=body, headers={"Content-Type": "application/json", "Host": "evil.example:8501"}
        ),
        "the app's own page over https (another origin)": client.post(
            "/api/v1/runs",
            content=body,
            headers={"Content-Type": "application/json", "Origin": "https://localhost:8501"},
        ),
    }
    for what, response in refused.items():
        assert response.status_code in (400, 403), (what, response.status_code, response.text)
        assert response.json()["error"], what
    assert refused["a page of another site, as text/plain (no preflight)"].status_code == 403
    assert refused["a rebound host name"].status_code == 400
    assert "ALLOWED_HOSTS" in refused["a rebound host name"].json()["error"]
    assert runs_count(home) == 0

    # The same run from a program (no Origin) or the app's own page, as JSON: queued.
    for headers in ({}, {"Origin": APP}):
        assert client.post("/api/v1/runs", json=RUN, headers=headers).status_code == 201
    assert runs_count(home) == 2


def test_every_answer_forbids_framing_and_a_foreign_host_reaches_neither_pages_nor_websocket(home, monkeypatch):
    client = served(home, monkeypatch)
    for path in ("/", "/api/v1/health", "/api/v1/nothing-here"):
        response = client.get(path)
        assert {k: response.headers.get(k) for k in FRAME_HEADERS} == FRAME_HEADERS, path
    with client.websocket_connect("/_stcore/stream", headers={"Host": "localhost:8501"}) as ws:
        assert ws.receive_text() == "hello"

    for host in (
        "evil.example",
        "localhost.evil.example:8501",
        "127.0.0.1.evil.example",
        "localhost:8501@evil",
        "evil.example/localhost",
        "",
    ):
        response = client.get("/", headers={"Host": host})
        assert response.status_code == 400 and "ALLOWED_HOSTS" in response.json()["error"], host
        assert response.headers["x-frame-options"] == "SAMEORIGIN"
        assert "<html>" not in response.text
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/_stcore/stream", headers={"Host": "evil.example:8501"}) as ws:
            ws.receive_text()
    assert refused.value.code == 1008

    # Behind a proxy, the public name is the one allowed.
    public = served(home, monkeypatch, ALLOWED_HOSTS="lymphoma.example.org")
    assert public.get("/", headers={"Host": "lymphoma.example.org"}).status_code == 200
    assert public.get("/").status_code == 400  # localhost is no longer listed


def test_allowed_hosts_entries():
    default = load_settings({}).allowed_hosts
    assert default == ("localhost", "127.0.0.1", "[::1]")
    for host in ("localhost", "LOCALHOST:8501", "localhost.", "127.0.0.1:1", "[::1]:8501", "[::1]"):
        assert host_allowed(host, "http", default), host
    for host in ("localhost:bad", "[::1", "127.0.0.2", "0.0.0.0:8501", "a.localhost", "local host", None):
        assert not host_allowed(host, "http", default), host
    listed = ("app.lab.org:443", "*.example.org", "::1")
    assert host_allowed("app.lab.org", "https", listed) and not host_allowed("app.lab.org", "http", listed)
    assert host_allowed("a.b.example.org:8501", "ws", listed) and not host_allowed("example.org", "http", listed)
    assert host_allowed("[::1]:80", "http", listed) and host_allowed("anything", "http", ("*",))
    assert load_settings({"ALLOWED_HOSTS": " App.Lab.org , "}).allowed_hosts == ("app.lab.org",)
    assert load_settings({"ALLOWED_HOSTS": ""}).allowed_hosts == default


def test_allowed_origins_may_call_the_api_from_a_browser(home):
    app = Starlette(routes=api_routes(dataclasses.replace(home, allowed_origins=("https://tools.lab.org",))))
    client = CheckedClient(app, base_url=APP, client=("127.0.0.1", 50000))
    for origin, site, status in (
        ("https://tools.lab.org", "cross-site", 200),
        ("https://tools.lab.org:443", "", 200),
        ("http://tools.lab.org", "", 403),
        ("https://evil.example", "", 403),
        ("", "same-site", 403),
        (APP, "same-origin", 200),
        ("", "none", 200),
    ):
        headers = {k: v for k, v in (("Origin", origin), ("Sec-Fetch-Site", site)) if v}
        assert client.get("/api/v1/runs", headers=headers).status_code == status, (origin, site)


# ---------------------------------------------------------------------------------------------
# Run settings: the form's bounds, for the API and the command line


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("image_size", 100_000, "from 32 to 1024"),
        ("per_class", 10**9, "from 1 to 100000"),
        ("epochs", 10**30, "from 1 to 1000"),
        ("batch_size", 10**7, "from 1 to 1024"),
        ("lr", 1e400, "finite"),  # JSON's 1e400 is Python's inf
        ("seed", -5, "from 0 to 2147483647"),
        ("seed", 2**70, "from 0 to 2147483647"),
        ("test_fraction", 0.99, "from 0.05 to 0.9"),
        ("device", "rm -rf /", "auto, cpu, cuda or cuda:N"),
        ("device", "cuda:x", "auto, cpu, cuda or cuda:N"),
        ("dataset", "synthetic\u0000", "NUL"),
    ],
)
def test_run_settings_out_of_bounds_are_422_naming_the_setting(home, setting, value, words):
    client = CheckedClient(Starlette(routes=api_routes(home)), client=("127.0.0.1", 50000))
    body = json.dumps({**RUN, setting: value}).replace("Infinity", "1e400")
    before = runs_count(home)
    response = client.post("/api/v1/runs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert f"'{setting}'" in response.json()["error"] and words in response.json()["error"]
    assert runs_count(home) == before


def test_the_command_line_keeps_to_the_same_bounds(capsys):
    from core.__main__ import main

    assert main(["train", "--dataset", "synthetic", "--image-size", "100000", "--weights", "none"]) == 2
    assert "'image_size' (--image-size) must be from 32 to 1024" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# What used to be a 500


NUL_NAMED_FILE = (
    b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="slide\x00.png"\r\n\r\n'
    b"not an image\r\n--b0undary--\r\n"
)  # as a client that does not escape it sends it


def test_values_that_name_nothing_are_4xx_with_a_json_message(home):
    client = CheckedClient(Starlette(routes=api_routes(home)), client=("127.0.0.1", 50000))
    json_body = {"Content-Type": "application/json"}
    answers = {
        404: [
            client.get(f"/api/v1/runs/{2**63}"),
            client.get("/api/v1/runs/" + "9" * 5000),
            client.get(f"/api/v1/runs/{2**63 - 1}"),
        ],
        422: [
            client.get("/api/v1/predictions", params={"since": "9999-12-31T23:59:59-23:59"}),
            client.get("/api/v1/predictions", params={"until": "0001-01-01T00:00:00+23:59"}),
            client.get("/api/v1/predictions", params={"run": str(2**63)}),
            client.get("/api/v1/predictions", params={"limit": "9" * 5000}),
            client.get("/api/v1/predictions", params={"user": "ana\x00"}),
            client.get("/api/v1/runs", params={"dataset": "synthetic\x00"}),
            client.post("/api/v1/runs", content="[" * 100_000 + "]" * 100_000, headers=json_body),
            client.post("/api/v1/runs", content='{"augmentation": ' + "[" * 40 + "]" * 40 + "}", headers=json_body),
            client.post("/api/v1/runs", content='{"seed": 1' + "0" * 5000 + "}", headers=json_body),
            client.post(
                "/api/v1/predict",
                content=NUL_NAMED_FILE,
                headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
            ),
        ],
    }
    for status, responses in answers.items():
        for response in responses:
            assert response.status_code == status, (response.request.url, response.text[:200])
            assert response.json()["error"]
    assert "NUL" in answers[422][4].json()["error"] and "NUL" in answers[422][9].json()["error"]
    assert all("levels deep" in r.json()["error"] for r in answers[422][6:8])


# ---------------------------------------------------------------------------------------------
# Tokens: a right secret is never refused; an old argon2-kept one is refused with what to do


@pytest.fixture
def vera_token(settings: Settings) -> str:
    """A viewer token of vera's in the accounts file; the token itself."""
    return tokens.add_token(settings.accounts_file, "vera", VIEWER)[1]


def test_guesses_from_many_addresses_never_lock_out_the_right_token(settings, Session, vera_token):
    auth = Authenticator(dataclasses.replace(settings, auth_mode="password"), Session)
    auth.throttle = SignInThrottle(Session, pair=Limit(2, 60), address=Limit(4, 300), name=Limit(3, 300))
    wrong = vera_token[:-4] + ("AAAA" if not vera_token.endswith("AAAA") else "BBBB")

    def status(token: str, address: str) -> int:
        try:
            auth.token_user(token, address)
        except ApiError as e:
            return e.status
        return 200

    # Ten addresses guess at the token's (public) id; its name-wide count is well past its limit.
    assert [status(wrong, f"10.0.0.{i}") for i in range(10)] == [401] * 10
    assert status(vera_token, "10.0.9.9") == 200  # its holder, from an address of her own
    assert status(vera_token, "10.0.0.5") == 200  # even from an address that guessed
    # Guessing stays slow: an address that guessed while the id was under attack is locked out at once.
    assert status(wrong, "10.0.0.5") == 429
    assert [status(wrong, "10.0.8.1") for _ in range(2)] == [401, 429]


def test_a_token_kept_as_an_argon2_hash_is_refused_with_what_to_do_and_the_rest_of_the_file_works(settings, capsys):
    secret = "s" * 43  # its right secret: refused all the same
    old_hash = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(secret)
    accounts.write_accounts(
        settings.accounts_file,
        accounts.Accounts(
            tokens={"0123456789ab": ApiToken("0123456789ab", "vera", VIEWER, old_hash, "2025-01-01T00:00:00+00:00")}
        ),
    )
    _, new = tokens.add_token(settings.accounts_file, "ed", EDITOR)
    client = CheckedClient(
        Starlette(routes=api_routes(dataclasses.replace(settings, auth_mode="password"))), client=("203.0.113.9", 50000)
    )
    answers = [
        client.get("/api/v1/runs", headers={"Authorization": f"Bearer lk_0123456789ab_{secret}"}) for _ in range(6)
    ]
    # 401 every time, never 429: a token refused whatever its secret counts no failed attempt.
    assert [a.status_code for a in answers] == [401] * 6
    assert answers[0].headers["www-authenticate"].startswith("Bearer")
    message = answers[0].json()["error"]
    assert "no longer accepted" in message and "token add" in message and "token remove 0123456789ab" in message
    assert "vera" not in message  # whoever sends the (public) id reads it
    assert client.get("/api/v1/runs", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    assert core_main(["token", "--file", str(settings.accounts_file), "list"]) == 0
    listed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert listed["0123456789ab"].endswith("old: refused, make it again") and "old" not in listed[new[3:15]]


# ---------------------------------------------------------------------------------------------
# The prediction log: a viewer reads their own rows


def test_a_viewer_reads_only_their_own_predictions_and_an_editor_all(settings, Session):
    settings = dataclasses.replace(settings, auth_mode="password")
    _, vera = tokens.add_token(settings.accounts_file, "vera", VIEWER)
    _, ed = tokens.add_token(settings.accounts_file, "ed", EDITOR)
    base = prediction_log.LogEntry(
        user="vera",
        source="api",
        run_id=1,
        model_sha256="m" * 64,
        image_sha256="i" * 64,
        image_name="p-1234.tif",
        width=64,
        height=48,
        size_bytes=100,
        probabilities={"CLL": 0.7, "FL": 0.3},
        probability_kind="raw",
        predicted="CLL",
        refer=None,
        threshold=None,
    )
    with Session.begin() as s:
        prediction_log.record(
            s, [base, dataclasses.replace(base, user="ana", image_name="smith-john.tif", predicted="FL")]
        )
    client = CheckedClient(Starlette(routes=api_routes(settings)), client=("203.0.113.5", 50000))

    def names(token: str, **params) -> list[str]:
        response = client.get("/api/v1/predictions", params=params, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        return sorted(p["image_name"] for p in response.json()["predictions"])

    assert names(vera) == names(vera, user="vera") == ["p-1234.tif"]
    assert names(ed) == ["p-1234.tif", "smith-john.tif"] and names(ed, user="ana") == ["smith-john.tif"]
    refused = client.get("/api/v1/predictions", params={"user": "ana"}, headers={"Authorization": f"Bearer {vera}"})
    assert refused.status_code == 403 and "only their own" in refused.json()["error"]

    # The Predict page's history reads through the same rule.
    with Session() as s:
        mine = views.prediction_history(s, reader=User("vera", VIEWER))
        every = views.prediction_history(s, reader=User("ed", EDITOR))
    assert [r.image_name for r in mine.rows] == ["p-1234.tif"] and mine.choices.users == ("vera",)
    assert mine.choices.predicted == ("CLL",) and len(every.rows) == 2 and every.choices.users == ("ana", "vera")


# ---------------------------------------------------------------------------------------------
# GET /models: each model file hashed once, however many there are


def test_model_hashes_are_kept_for_every_file_until_it_changes(tmp_path, monkeypatch):
    import hashlib

    files = [tmp_path / f"model-{i}.safetensors" for i in range(80)]  # more than the old cache's 64
    for i, path in enumerate(files):
        path.write_bytes(b"weights %d" % i)
    read = []
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: read.append(f.name) or digest(f, name))
    first = [approval.file_sha256(p) for p in files]
    assert first[3] == hashlib.sha256(b"weights 3").hexdigest() and len(read) == 80
    assert [approval.file_sha256(p) for p in files] == first and len(read) == 80  # a second call: none read
    files[5].write_bytes(b"retrained weights")
    assert approval.file_sha256(files[5]) == hashlib.sha256(b"retrained weights").hexdigest() and len(read) == 81
