from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


def test_home_renders_on_an_empty_install(settings, monkeypatch):
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("START_WORKER", "0")  # workers are tested in test_jobs.py
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Lymphoma subtype recognition" in at.title[0].value
    assert any("No datasets yet" in i.value for i in at.info)
