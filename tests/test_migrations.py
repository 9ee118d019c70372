"""Schema migrations (core/store/migrations): a database of any age reaches the models' schema.

"Old" databases are made the way the version before migrations made them: that version's models
(core/store/db.py at commit 6e3864e, read from git) and create_all, with no alembic_version table.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Text, create_engine, func, inspect, select, text
from sqlalchemy.pool import NullPool

from core.__main__ import main
from core.errors import UserError
from core.store import migrations
from core.store.db import Base, Dataset, DatasetVersion, DatasetVersionImage, Image, PredictionLog, Run, Slide
from core.store.engine import make_engine, make_sessionmaker
from core.store.review_tables import Review

ROOT = Path(__file__).resolve().parents[1]
BEFORE_MIGRATIONS = "6e3864e"  # the version the baseline revision was taken from (it ran create_all)
NEW_COLUMNS = {"datasets": "groups_estimated", "prediction_log": "refer_target"}  # added since


@pytest.fixture(scope="module")
def old_models(tmp_path_factory) -> ModuleType:
    """core/store/db.py as it was at BEFORE_MIGRATIONS, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_MIGRATIONS}:core/store/db.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = tmp_path_factory.mktemp("old") / "old_db.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_db", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_db"] = module  # its annotations are resolved by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'app.db'}"


def make_old_database(old, url: str) -> dict[str, int]:
    """A database as the old version left it, with a dataset, an image, a run and a logged prediction."""
    engine = create_engine(url, poolclass=NullPool)
    old.Base.metadata.create_all(engine)
    with old.sessionmaker(engine).begin() as s:
        dataset = old.Dataset(name="lymphoma", classes=["CLL", "FL"], source="/src")
        image = old.Image(
            dataset=dataset,
            label="CLL",
            sha256="a" * 64,
            stored_path="images/a.png",
            original_name="CLL/1.tif",
            width=8,
            height=8,
            mode="RGB",
            group="p1",
        )
        run = old.Run(dataset=dataset, experiment="e1", config={"epochs": 1}, seed=3, name="first")
        s.add_all([dataset, image, run])
        s.flush()
        log = old.PredictionLog(
            user="ana",
            source="cli",
            run_id=run.id,
            model_sha256="b" * 64,
            image_sha256="c" * 64,
            image_name="x.png",
            width=8,
            height=8,
            size_bytes=10,
            probabilities={"CLL": 0.9, "FL": 0.1},
            probability_kind="calibrated",
            predicted="CLL",
            refer=False,
            threshold=0.8,
            at=datetime(2026, 1, 2),
        )
        s.add(log)
        s.flush()
        ids = {"dataset": dataset.id, "image": image.id, "run": run.id, "log": log.id}
    engine.dispose()
    return ids


def schema_differences(url: str) -> list:
    """What alembic's autogenerate finds between the database and the models (nothing, at head)."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        return migrations.current_revision(conn)


def test_a_database_made_before_migrations_is_upgraded_keeping_its_rows(old_models, url):
    ids = make_old_database(old_models, url)
    Session = make_sessionmaker(url)
    assert revision(url) == migrations.head()
    with Session() as s:
        dataset, image, run, log = (
            s.get(Dataset, ids["dataset"]),
            s.get(Image, ids["image"]),
            s.get(Run, ids["run"]),
            s.get(PredictionLog, ids["log"]),
        )
        assert (dataset.name, dataset.classes, dataset.groups_estimated) == ("lymphoma", ["CLL", "FL"], None)
        assert (dataset.tile_px, dataset.tile_mpp) == (None, None)  # 0004: no scale recorded before
        assert s.scalar(select(func.count()).select_from(Slide)) == 0
        assert (image.group, image.dataset_id) == ("p1", dataset.id)
        assert (run.name, run.config, run.attempts) == ("first", {"epochs": 1}, 0)
        assert (log.predicted, log.threshold, log.refer_target, log.at) == ("CLL", 0.8, None, datetime(2026, 1, 2))
    for table, column in NEW_COLUMNS.items():
        assert column in {c["name"] for c in inspect(Session.kw["bind"]).get_columns(table)}
    assert schema_differences(url) == []


def test_each_dataset_of_an_old_database_becomes_version_1_of_itself(old_models, url):
    ids = make_old_database(old_models, url)
    with make_sessionmaker(url)() as s:
        (version,) = s.scalars(select(DatasetVersion)).all()
        (member,) = s.scalars(select(DatasetVersionImage)).all()
    assert (version.dataset_id, version.number, version.created_by, version.counts) == (
        ids["dataset"],
        1,
        None,
        {"CLL": 1, "FL": 0},
    )
    assert (member.version_id, member.image_id, member.label, member.group) == (version.id, ids["image"], "CLL", "p1")


def test_a_database_older_than_the_baseline_is_completed_then_upgraded(old_models, tmp_path):
    """Made by a version older still: a column and a table missing. The additive patch that ran
    before migrations adds them once (the column with its server default), then it is stamped."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    ids = make_old_database(old_models, url)
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE runs DROP COLUMN attempts"))
        conn.execute(text("DROP TABLE failures_seen"))
        conn.execute(text("DROP INDEX ix_prediction_log_at"))
    done = migrations.upgrade(engine)
    assert (done.before, done.after, done.found) == (None, migrations.head(), "made before migrations")
    with make_sessionmaker(url)() as s:
        assert s.get(Run, ids["run"]).attempts == 0
    assert schema_differences(url) == []


def test_the_baseline_is_the_schema_the_last_version_before_migrations_made(old_models, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}", poolclass=NullPool)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), migrations.BASELINE)
        assert compare_metadata(MigrationContext.configure(conn), old_models.Base.metadata) == []


def test_a_new_database_made_by_the_migrations_has_the_models_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    assert schema_differences(url) == []
    with engine.connect() as conn:  # the migration switched them off on its connection, and back on
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_table_rebuilt_in_a_migration_keeps_the_rows_that_refer_to_it(tmp_path):
    """SQLite changes a column by copying its table and dropping the old one (batch mode); the
    schema transaction holds foreign keys off, or the drop would delete the dataset's images."""
    Session = make_sessionmaker(f"sqlite:///{tmp_path / 'app.db'}")
    with Session.begin() as s:
        s.add(
            Image(
                dataset=Dataset(name="ds", classes=["a"]),
                label="a",
                sha256="a" * 64,
                stored_path="p",
                original_name="a/1.png",
                width=1,
                height=1,
                mode="RGB",
            )
        )
    with migrations.schema_transaction(Session.kw["bind"]) as conn:
        with Operations(MigrationContext.configure(conn)).batch_alter_table("datasets", recreate="always") as batch:
            batch.alter_column("source", existing_type=Text(), nullable=True)
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 1
        assert s.scalar(select(Dataset.name)) == "ds"


def test_reviews_recorded_before_blind_reviews_are_marked_not_blind(url):
    """Revision 0009 adds reviews.blind: a review recorded before was given seeing the model's answer."""
    engine = create_engine(url, poolclass=NullPool)
    with migrations.schema_transaction(engine) as conn:
        command.upgrade(migrations.alembic_config(conn), "0008")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO reviews (log_id, run_id, image_sha256, predicted, refer, predicted_at, reviewer, "
                "reviewed_at, true_class, note) VALUES (1, 2, :sha, 'CLL', true, :at, 'ana', :at, 'FL', '')"
            ),
            {"sha": "a" * 64, "at": datetime(2026, 12, 1)},
        )
    engine.dispose()
    Session = make_sessionmaker(url)  # upgrades to the newest revision
    assert revision(url) == migrations.head() and schema_differences(url) == []
    with Session() as s:
        assert [(r.reviewer, r.true_class, r.blind) for r in s.scalars(select(Review))] == [("ana", "FL", False)]


def test_one_engine_per_database_per_process(tmp_path):
    first = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    assert make_engine(f"sqlite:///{tmp_path / 'a.db'}") is first
    assert make_engine(f"sqlite:///{tmp_path / 'b.db'}") is not first
    assert make_engine("sqlite://") is not make_engine("sqlite://")  # each in-memory database is its own


def test_migrate_prints_the_revisions_before_and_after(old_models, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("APP_HOME", str(home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    make_old_database(old_models, f"sqlite:///{home / 'app.db'}")
    assert main(["migrate"]) == 0
    head = migrations.head()
    assert capsys.readouterr().out == f"before: none (made before migrations)\nafter: {head}\n"
    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"before: {head}\nafter: {head}\n"


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    make_engine(url).dispose()
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(UserError, match="revision 9999"):
        migrations.upgrade(engine)
