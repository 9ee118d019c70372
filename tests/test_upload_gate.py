"""serve.py's gate on a real server (AUTH_MODE=password): Streamlit's upload route takes files only
for signed-in sessions and within MAX_SESSION_UPLOAD_MB each, and media files are served only to a
browser with a signed-in session. Requests are made by hand, as any client can make them."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from core.access import accounts
from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.ingest import ingest
from core.store.engine import make_sessionmaker
from tests.server import ProtocolClient, free_port, start_app, stop_app, wait_healthy
from tests.synthetic import write_dataset

PASSWORD = "correct horse battery"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with ana's account, a small dataset (for thumbnails) and a 1 MB total per session."""
    home = tmp_path_factory.mktemp("gate-server")
    accounts.add_account(home / "accounts.toml", "ana", PASSWORD, accounts.EDITOR)
    settings = load_settings({"APP_HOME": str(home)})
    with make_sessionmaker(settings.database_url).begin() as s:
        ingest(s, settings, write_dataset(home / "src", per_class=1), "synthetic", user=LOCAL_USER)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(
        APP_HOME=str(home),
        AUTH_MODE="password",
        AUTH_FILE=str(home / "accounts.toml"),
        START_WORKER="0",
        MAX_SESSION_UPLOAD_MB="1",
    )
    port = free_port()
    with open(home / "streamlit.log", "wb") as log:
        process = start_app(port, env, log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, log=home / "streamlit.log")
            yield f"http://127.0.0.1:{port}", process.pid
        finally:
            stop_app(process)


def browser_cookie(url: str) -> str:
    """The cookie that the gate gives a browser on its first page load, as a Cookie header value."""
    with urllib.request.urlopen(url + "/") as r:
        return r.headers["set-cookie"].split(";")[0]


def signed_in(url: str, cookie: str | None = None) -> ProtocolClient:
    """A session that has signed in through the sign-in form."""
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    client = ProtocolClient(url, cookie)
    form = client.rerun()
    inputs = {e.text_input.label: e.text_input.id for e in form if e.WhichOneof("type") == "text_input"}
    submit = next(e.button.id for e in form if e.WhichOneof("type") == "button" and e.button.is_form_submitter)
    page = client.rerun(
        WidgetState(id=inputs["User name"], string_value="ana"),
        WidgetState(id=inputs["Password"], string_value=PASSWORD),
        WidgetState(id=submit, trigger_value=True),
    )
    assert "Sign out" in [e.button.label for e in page if e.WhichOneof("type") == "button"]
    return client


def put_file(url: str, session_id: str, size: int, chunked: bool = False) -> int:
    """PUT a file of `size` bytes to the session's upload route, as Streamlit's uploader does (with
    an XSRF token of its own making, which passes); the status of the answer. The body is sent
    from a thread, so that an answer that comes before the body is read all the same."""
    from streamlit.web.server.starlette.starlette_app_utils import generate_xsrf_token_string

    token, boundary = generate_xsrf_token_string(), uuid.uuid4().hex
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = part.encode() + os.urandom(size) + f"\r\n--{boundary}--\r\n".encode()
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    if chunked:
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    host = url.removeprefix("http://")
    head = (
        f"PUT /_stcore/upload_file/{session_id}/{uuid.uuid4()} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{length}\r\nX-Xsrftoken: {token}\r\n"
        f"Cookie: _streamlit_xsrf={token}\r\nConnection: close\r\n\r\n"
    ).encode()
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=30) as sock:
        sock.sendall(head)

        def send_body() -> None:
            with contextlib.suppress(OSError):  # the server may close once it has answered
                sock.sendall(body)

        sender = threading.Thread(target=send_body)
        sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        sender.join()
    return response.status


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_signed_out_session_cannot_upload_and_holds_no_memory(server):
    url, pid = server
    visitor = ProtocolClient(url)
    visitor.rerun()  # connected, shown the sign-in form
    before = resident_mb(pid)
    statuses = [put_file(url, visitor.session_id, 40 * MB) for _ in range(3)]
    grown = resident_mb(pid) - before
    visitor.close()
    assert statuses == [403] * 3
    assert grown < 30, f"the server grew by {grown:.0f} MB"


def test_a_signed_in_session_uploads_within_its_total(server):
    url, _ = server
    client = signed_in(url)
    assert put_file(url, client.session_id, 600 * 1024) == 204
    assert put_file(url, client.session_id, 600 * 1024) == 413  # 1.2 MB together: past MAX_SESSION_UPLOAD_MB
    assert put_file(url, client.session_id, 300 * 1024, chunked=True) == 411  # no size to count
    client.close()


def test_media_files_are_served_only_to_a_browser_with_a_signed_in_session(server):
    from streamlit.proto.BackMsg_pb2 import BackMsg

    url, _ = server
    cookie = browser_cookie(url)
    client = signed_in(url, cookie)
    msg = BackMsg()
    msg.rerun_script.page_name = "dataset"
    client.send(msg)
    thumbnails = [i.url for e in client.until_finished(90) if e.WhichOneof("type") == "imgs" for i in e.imgs.imgs]
    assert thumbnails and all(u.startswith("/media/") for u in thumbnails)

    def status(cookie: str | None) -> int:
        request = urllib.request.Request(url + thumbnails[0], headers={"Cookie": cookie} if cookie else {})
        try:
            with urllib.request.urlopen(request) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(cookie) == 200
    assert status(None) == 403  # the address alone, copied elsewhere
    assert status(browser_cookie(url)) == 403  # another browser, signed in nowhere
    client.close()
    deadline = time.monotonic() + 10  # the server notices the closed connection within moments
    while status(cookie) != 403:
        assert time.monotonic() < deadline, "media still served after the session closed"
        time.sleep(0.1)
