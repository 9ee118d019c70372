"""What only the people who run the server read: tracebacks and the server's paths.

A failed run's technical log (its error in full, the end of its training log) is for editors; the
run's message names a file by its name; the Datasets page says where a dataset came from by its name
below the import root; the sign-in page names a broken accounts file by its name. And a disk that
fills up while a run writes its model file (safetensors says so with a SafetensorError quoting
"os error 28", not an OSError): the run ends failed with the disk-full message, logged in one line,
without a traceback.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from streamlit.testing.v1 import AppTest

from core.access import accounts
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER
from core.config import Settings, load_settings
from core.data import uploads
from core.errors import UserError
from core.inference import model_file
from core.jobs import execute, runs
from core.store.db import Run, RunStatus, utcnow
from core.store.engine import make_sessionmaker
from core.store.records import RunSummary
from core.store.runs import model_path, run_dir
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
UNUSED_HASH = "$argon2id$v=19$m=65536,t=3,p=4$unused"  # sessions are signed in directly: no password is checked
TINY = dict(image_size=32, epochs=1, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu", seed=3)
# safetensors' own words for a full disk (safetensors 0.8, writing to a full tmpfs).
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def lab(tmp_path) -> tuple[Settings, Path, int]:
    """A dataset imported from a folder below IMPORT_ROOTS and a failed run whose error and log quote
    paths under APP_HOME, with a traceback; (settings, the import root, the run's id)."""
    imports = tmp_path / "imports"
    write_dataset(imports / "lymphoma", per_class=3)
    cfg = load_settings({"APP_HOME": str(tmp_path / "home"), "IMPORT_ROOTS": str(imports)})
    stored = f"{cfg.app_home}/images/ab/abc.png"
    Session = make_sessionmaker(cfg.database_url)
    with Session.begin() as s:
        uploads.import_folder(s, cfg, imports / "lymphoma", "lymphoma", user=LOCAL_USER)
        (run,) = runs.create_runs(s, cfg, RunConfig(dataset="lymphoma", **TINY), user=LOCAL_USER)
        run.status, run.finished_at = RunStatus.failed, utcnow()
        run.error = f"FileNotFoundError: [Errno 2] No such file or directory: '{stored}'"
        run.weights_used = f"file {tmp_path}/weights/densenet.pt"
        run.log_tail = (
            f"12:00:00 ERROR run {run.id} failed\nTraceback (most recent call last):\n"
            f'  File "{ROOT}/core/jobs/execute.py", line 140, in execute_run\n{run.error}'
        )
        run_id = run.id
    accounts.write_accounts(
        tmp_path / "accounts.toml",
        accounts.Accounts(
            {"vic": accounts.Account("vic", UNUSED_HASH, VIEWER), "ana": accounts.Account("ana", UNUSED_HASH, EDITOR)}
        ),
    )
    return cfg, imports.resolve(), run_id


def open_app(monkeypatch, cfg: Settings, user: str) -> AppTest:
    monkeypatch.setenv("APP_HOME", str(cfg.app_home))
    monkeypatch.setenv("IMPORT_ROOTS", ":".join(str(r) for r in cfg.import_roots))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.setenv("AUTH_MODE", "password")
    monkeypatch.setenv("AUTH_FILE", str(cfg.app_home.parent / "accounts.toml"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["auth_user"] = user
    return at.run()


def open_page(monkeypatch, cfg: Settings, page: str, user: str) -> AppTest:
    at = open_app(monkeypatch, cfg, user).switch_page(page).run()
    assert not at.exception, at.exception
    return at


def strings(message):
    """Every string of a protobuf message, nested messages included."""
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if field.type == field.TYPE_MESSAGE:
                yield from strings(item)
            elif field.type == field.TYPE_STRING:
                yield item


def page_text(at: AppTest) -> str:
    """Every string the page (and its sidebar) sends to the browser, tables' cells included."""
    parts = [
        text for node in at._tree if hasattr(getattr(node, "proto", None), "ListFields") for text in strings(node.proto)
    ]
    parts += [table.value.to_csv() for table in at.dataframe]
    return "\n".join(parts)


def test_a_viewer_reads_a_failed_run_without_traceback_or_server_paths_and_an_editor_reads_both(lab, monkeypatch):
    cfg, _, run_id = lab
    at = open_page(monkeypatch, cfg, "pages/runs.py", "vic")
    text = page_text(at)
    assert "Traceback" not in text and str(cfg.app_home) not in text and str(cfg.app_home.parent) not in text
    assert not at.code and not [x for x in at.expander if x.label == "Technical log"]
    (failure,) = [e.value for e in at.error if "This run failed" in e.value]
    assert "abc.png" in failure.replace("\\", "")  # the file by its name
    assert "densenet.pt" in text  # the weights by their name

    at = open_page(monkeypatch, cfg, "pages/runs.py", "ana")
    (technical,) = [x for x in at.expander if x.label == "Technical log"]
    (log,) = technical.code
    assert "Traceback" in log.value and f"{cfg.app_home}/images/ab/abc.png" in log.value


def test_the_datasets_page_names_its_source_for_a_viewer_without_server_paths(lab, monkeypatch):
    cfg, imports, _ = lab
    at = open_page(monkeypatch, cfg, "pages/dataset.py", "vic")
    text = page_text(at)
    assert str(imports) not in text and str(cfg.app_home) not in text
    assert any(c.value.startswith("Source: lymphoma ·") for c in at.caption)

    at = open_page(monkeypatch, cfg, "pages/dataset.py", "ana")
    assert any(c.value.replace("\\", "").startswith(f"Source: {imports}/lymphoma ·") for c in at.caption)


def test_the_sign_in_page_names_a_missing_accounts_file_without_its_path(lab, monkeypatch):
    cfg, _, _ = lab
    (cfg.app_home.parent / "accounts.toml").unlink()
    (error,) = open_app(monkeypatch, cfg, "vic").error
    assert "accounts.toml" in error.value and str(cfg.app_home.parent) not in error.value


# ---------------------------------------------------------------------------------------------
# A full disk while the model file is written


def test_a_full_disk_while_writing_a_model_file_is_the_disk_full_user_error(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(model_file, "save_file", no_space)
    path = tmp_path / "runs" / "7" / "model.safetensors"
    with pytest.raises(UserError) as refused:
        model_file.write_model(path, {"w": torch.zeros(2)}, {"run_id": 7})
    message = str(refused.value)
    assert message.startswith("The disk is full: model.safetensors could not be stored (")
    assert "`python -m core resume 7`" in message and str(tmp_path) not in message
    assert "resume the run on the Runs page" in refused.value.for_page()
    assert list(path.parent.iterdir()) == []  # no partial file left

    def damaged(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(model_file, "save_file", damaged)
    with pytest.raises(SafetensorError):  # not a full disk: a bug, with its traceback
        model_file.write_model(path, {"w": torch.zeros(2)}, {"run_id": 7})


class TinyNet(torch.nn.Module):
    """Stands in for DenseNet-201, which takes seconds to build: one convolution and a classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(OrderedDict(denseblock4=torch.nn.Conv2d(3, 4, 3, padding=1)))
        self.classifier = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_a_run_whose_model_file_meets_a_full_disk_fails_with_the_message_and_one_log_line(
    settings, Session, tmp_path, monkeypatch
):
    write_dataset(tmp_path / "src", per_class=4, classes=("CLL", "FL"))
    with Session.begin() as s:
        from core.data.ingest import ingest

        ingest(s, settings, tmp_path / "src", "a", user=LOCAL_USER)
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="a", **TINY), user=LOCAL_USER)
    monkeypatch.setattr(execute, "build_model", lambda n, weights: (TinyNet(n), "none (a stand-in model)"))
    real_save = model_file.save_file

    def full_at_the_model_file(tensors, path, metadata=None):
        if metadata is not None:  # the model file (its description); the best epoch's weights have none
            raise SafetensorError(DISK_FULL)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(model_file, "save_file", full_at_the_model_file)
    with pytest.raises(UserError, match="The disk is full"):
        execute.execute_run(Session, settings, run.id)
    with Session() as s:
        failed = s.get(Run, run.id)
        assert failed.status == RunStatus.failed and failed.finished_at is not None
        assert failed.error.startswith("The disk is full: model.safetensors could not be stored"), failed.error
        assert f"resume {run.id}" in failed.error
        assert "Runs page" in RunSummary.from_dict(failed.summary).error_page
    assert not model_path(settings, run.id).exists()
    log = (run_dir(settings, run.id) / "train.log").read_text()
    assert "Traceback" not in log and "SafetensorError" not in log
    assert [line for line in log.splitlines() if "failed" in line] == [
        next(line for line in log.splitlines() if f"run {run.id} failed: The disk is full" in line)
    ]
