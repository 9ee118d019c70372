"""The review loop in core: referred images kept for review, the queue's order, reviews with their
reviewer (editors only), two reviewers' disagreement, field accuracy worked out by hand, reviewed
images into a new dataset version, and training again on it with the old run's test images frozen.

No training: log rows, reviews and test predictions are written to order; the one dataset is a few
synthetic images and its run is only queued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from core.access.accounts import EDITOR, LOCAL_USER, VIEWER, User
from core.access.limits import GB, disk_usage
from core.config import load_settings
from core.data import versions
from core.data.ingest import ingest
from core.data.splits import split_parts
from core.errors import UserError
from core.inference import prediction_log, service
from core.jobs import runs
from core.review import field, queue, retrain, store, to_data
from core.store.db import Prediction, PredictionLog, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image, write_dataset

CLASSES = ("CLL", "FL", "MCL")
ANA, BO, VIC = User("ana", EDITOR), User("bo", EDITOR), User("vic", VIEWER)
MONDAY = datetime(2026, 3, 2, 10, 0)  # a Monday


def png(label: str, index: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, index).save(buf, "PNG")
    return buf.getvalue()


def log(Session, run_id: int, predicted: str, confidence: float, refer: bool | None, *, at=None, data=b"", user="eve"):
    """A log row of run `run_id` made by hand; its id."""
    others = (1 - confidence) / (len(CLASSES) - 1)
    with Session.begin() as s:
        row = PredictionLog(
            user=user,
            source="page",
            run_id=run_id,
            model_sha256="0" * 64,
            image_sha256=hashlib.sha256(data or f"{predicted}{confidence}{at}".encode()).hexdigest(),
            image_name=f"{predicted.lower()}-{confidence}.png",
            width=64,
            height=48,
            size_bytes=len(data),
            probabilities={c: confidence if c == predicted else others for c in CLASSES},
            probability_kind="calibrated",
            predicted=predicted,
            refer=refer,
            threshold=0.8,
            at=at or datetime.now(),
        )
        s.add(row)
        s.flush()
        return row.id


def review(
    Session, settings, user: User, log_id: int, true_class: str | None, note: str = "", blind: bool = False
) -> None:
    with Session.begin() as s:
        store.record_review(s, settings, user, log_id, true_class, note, blind=blind)


@pytest.fixture
def home(tmp_path):
    return load_settings({"APP_HOME": str(tmp_path / "home")})


@pytest.fixture
def Session(home):
    return make_sessionmaker(home.database_url)


def classified(data: bytes, refer: bool) -> service.Classified:
    return service.Classified(
        name="x.png",
        image_sha256=hashlib.sha256(data).hexdigest(),
        width=64,
        height=48,
        size_bytes=len(data),
        predicted="CLL",
        probabilities={"CLL": 0.6, "FL": 0.3, "MCL": 0.1},
        kind="calibrated",
        refer=refer,
        threshold=0.8,
        run_id=1,
        model_sha256="0" * 64,
    )


def test_referred_images_are_kept_for_review_within_the_disk_limit(home, Session):
    referred, confident = png("CLL", 1), png("FL", 2)
    results = [classified(referred, True), classified(confident, False)]
    service._log(Session, home, ANA, "page", results, [referred, confident])
    with Session() as s:
        rows = {r.image_sha256: r.stored_path for r in s.scalars(select(PredictionLog))}
    sha = hashlib.sha256(referred).hexdigest()
    assert rows == {sha: prediction_log.stored_path(sha), results[1].image_sha256: None}
    assert (home.app_home / rows[sha]).read_bytes() == referred

    other = png("MCL", 3)
    tight = dataclasses.replace(home, max_disk_gb=(disk_usage(home) + len(other) // 2) / GB)
    service._log(Session, tight, ANA, "page", [classified(other, True)], [other])  # logged, not kept
    service._log(Session, dataclasses.replace(home, reviews=False), ANA, "page", [classified(other, True)], [other])
    with Session() as s:
        assert [r.stored_path for r in s.scalars(select(PredictionLog).where(PredictionLog.id > 2))] == [None, None]
    assert queue.kept_image(home, hashlib.sha256(other).hexdigest()) is None


def test_the_queue_puts_referred_predictions_first_then_the_least_confident(home, Session):
    now = datetime.now()
    confident = log(Session, 1, "CLL", 0.9, False, at=now)
    referred_high = log(Session, 1, "FL", 0.7, True, at=now - timedelta(hours=1))
    unsure = log(Session, 2, "MCL", 0.5, False, at=now - timedelta(hours=2))
    no_band = log(Session, 2, "CLL", 0.6, None, at=now - timedelta(hours=3))
    referred_low = log(Session, 1, "CLL", 0.4, True, at=now - timedelta(hours=4))
    with Session() as s:
        found = queue.review_queue(s, home, ANA)
        assert [i.prediction.id for i in found.items] == [referred_low, referred_high, unsure, no_band, confident]
        one_run = queue.review_queue(s, home, ANA, queue.QueueFilters(run_id=2))
        assert [i.prediction.id for i in one_run.items] == [unsure, no_band]
        cll = queue.review_queue(s, home, ANA, queue.QueueFilters(predicted="CLL", since=now - timedelta(hours=3.5)))
        assert [i.prediction.id for i in cll.items] == [no_band, confident]
        assert all(i.image_path is None for i in found.items)  # none kept: each says so
        with pytest.raises(UserError, match="only editors can review predictions"):
            queue.review_queue(s, home, VIC)
        with pytest.raises(UserError, match="REVIEWS=0"):
            queue.review_queue(s, dataclasses.replace(home, reviews=False), ANA)

    review(Session, home, ANA, referred_low, "FL")
    with Session() as s:  # reviewed by ana: out of her queue, still in bo's, with ana's review beside it
        assert referred_low not in [i.prediction.id for i in queue.review_queue(s, home, ANA).items]
        first = queue.review_queue(s, home, BO).items[0]
    assert first.prediction.id == referred_low and [(r.reviewer, r.verdict) for r in first.reviews] == [("ana", "FL")]


def test_reviews_are_recorded_with_their_reviewer_and_a_disagreement_is_a_case_apart(home, Session):
    case = log(Session, 4, "CLL", 0.55, True)
    review(Session, home, ANA, case, "FL", "nuclei **cleaved**")
    review(Session, home, ANA, case, "MCL", "on second look")  # replaces her own
    with Session() as s:
        (one,) = store.cases(s, run_id=4)
    assert [(r.reviewer, r.true_class, r.note) for r in one.reviews] == [("ana", "MCL", "on second look")]
    assert one.true_class == "MCL" and not one.disagreement and one.reviews[0].overruled

    review(Session, home, BO, case, None, "too blurred")  # a second reviewer: kept beside the first
    with Session() as s:
        (one,) = store.cases(s, run_id=4)
    assert [(r.reviewer, r.verdict) for r in one.reviews] == [("ana", "MCL"), ("bo", store.CANNOT_TELL)]
    assert one.disagreement and one.true_class is None

    for user, true_class, message in [
        (VIC, "FL", "vic is signed in as a viewer: only editors can review predictions"),
        (ANA, "DLBCL", "DLBCL is not one of them"),
    ]:
        with pytest.raises(UserError, match=message), Session.begin() as s:
            store.record_review(s, home, user, case, true_class)
    with pytest.raises(UserError, match="not in the log"), Session.begin() as s:
        store.record_review(s, home, ANA, case + 100, "FL")
    with Session() as s:
        assert len(store.cases(s, run_id=4)[0].reviews) == 2  # nothing more recorded


def test_field_accuracy_equals_the_figures_worked_out_by_hand(home, Session):
    week2 = MONDAY + timedelta(days=7)
    one = log(Session, 7, "CLL", 0.7, True, at=MONDAY)  # ana: CLL (right)
    two = log(Session, 7, "FL", 0.9, False, at=MONDAY + timedelta(days=1))  # ana: MCL (overruled)
    three = log(Session, 7, "CLL", 0.6, True, at=MONDAY + timedelta(days=2))  # ana CLL, bo FL: disagree
    log(Session, 7, "MCL", 0.95, False, at=MONDAY + timedelta(days=6, hours=13))  # not reviewed
    five = log(Session, 7, "MCL", 0.9, False, at=week2)  # ana and bo: MCL (right)
    six = log(Session, 7, "FL", 0.5, True, at=week2 + timedelta(days=1))  # ana: cannot tell
    seven = log(Session, 7, "FL", 0.8, False, at=week2 + timedelta(days=2))  # bo: FL (right)
    review(Session, home, ANA, log(Session, 8, "CLL", 0.9, False, at=MONDAY), "FL")  # another run's
    for user, log_id, true_class in [
        (ANA, one, "CLL"),
        (ANA, two, "MCL"),
        (ANA, three, "CLL"),
        (BO, three, "FL"),
        (ANA, five, "MCL"),
        (BO, five, "MCL"),
        (ANA, six, None),
        (BO, seven, "FL"),
    ]:
        review(Session, home, user, log_id, true_class, blind=user is BO)  # bo reviews blind
    with Session() as s:
        found = field.field_accuracy(s, 7)
        assert {(r.reviewer, r.blind) for c in store.cases(s, run_id=7) for r in c.reviews} == {
            ("ana", False),
            ("bo", True),
        }

    # Counted: one (CLL→CLL), two (MCL, the model said FL), five (MCL→MCL), seven (FL→FL).
    assert (found.reviewed, found.counted, found.disagreements, found.cannot_tell) == (6, 4, 1, 1)
    assert found.classes == CLASSES and found.accuracy == pytest.approx(3 / 4)
    assert found.low <= 0.75 <= found.high and 0 <= found.low and found.high <= 1
    assert found.confusion == ((1, 0, 0), (0, 1, 0), (0, 1, 1))  # rows: true class
    assert found.recall == (1.0, 1.0, 0.5)
    assert (found.predictions, found.referred) == (7, 3) and found.referred_share == pytest.approx(3 / 7)
    # Reviews naming a class: 7; naming another than the model's: ana on two, bo on three.
    assert (found.class_reviews, found.overruled) == (7, 2)
    weeks = [(w.week, w.predictions, w.referred, w.counted, w.right, w.class_reviews, w.overruled) for w in found.weeks]
    assert weeks == [(MONDAY.date(), 4, 2, 2, 1, 4, 2), (week2.date(), 3, 1, 2, 2, 3, 0)]
    assert found.weeks[0].accuracy == 0.5 and found.weeks[1].overruled_share == 0
    assert json.loads(json.dumps(found.to_json()))["weeks"][1]["week"] == week2.date().isoformat()
    assert "1 left out where reviewers disagree" in found.summary()
    # Blind reviews naming a class: bo's on three, five and seven.
    assert found.blind == 3 and "3 of 7 review(s) naming a class were given blind" in found.summary()
    # Counted cases every reviewer judged blind: seven only (bo: FL, right); five had ana too.
    # One right case: the exact (Clopper-Pearson) interval of 1 in 1, 2.5% to 100%, not a certainty.
    assert (found.blind_counted, found.blind_accuracy, found.blind_high) == (1, 1.0, 1.0)
    assert found.blind_low == pytest.approx(0.025)
    assert "Over the 1 case(s) every reviewer judged blind: 100.0%" in found.summary()
    # Reviewed twice: three (CLL, FL) and five (MCL, MCL). Agreement 1/2; by chance, from the 4 verdicts
    # (CLL 1/4, FL 1/4, MCL 2/4), 1/16 + 1/16 + 1/4 = 0.375; kappa = (0.5 - 0.375) / (1 - 0.375) = 0.2.
    assert (found.paired, found.paired_agreed) == (2, 1) and found.kappa == pytest.approx(0.2)
    assert "agree with each other on 1 of the 2 case(s) reviewed twice or more, 0.20 once corrected" in found.summary()


# ---------------------------------------------------------------------------------------------
# Reviewed images become data; the model is trained again on them with its test images frozen


@pytest.fixture
def lab(home, Session, tmp_path):
    return make_lab(home, Session, tmp_path)


def make_lab(home, Session, tmp_path) -> int:
    """Dataset 'lymphoma' (3 classes x 6 images, specimens of 2 images) and a queued holdout run: its id."""
    write_dataset(tmp_path / "src", per_class=6)
    groups = tmp_path / "groups.csv"
    groups.write_text("file,group\n" + "".join(f"{c}/{i:03d}.tif,{c}-{i // 2}\n" for c in CLASSES for i in range(6)))
    with Session.begin() as s:
        ingest(s, home, tmp_path / "src", "lymphoma", groups_csv=groups, user=LOCAL_USER)
    config = RunConfig(dataset="lymphoma", image_size=32, epochs=1, weights="none", device="cpu", test_fraction=0.3)
    with Session.begin() as s:
        (run,) = runs.create_runs(s, home, config, user=LOCAL_USER)
        return run.id


def reviewed_case(Session, home, run_id: int, label: str, index: int, *reviews) -> tuple[int, str]:
    """A referred prediction of a new image, kept for review, with `reviews` ((user, class)...)."""
    data = png(label, 100 + index)
    sha = prediction_log.keep_for_review(home, [(hashlib.sha256(data).hexdigest(), data)])
    log_id = log(Session, run_id, "CLL", 0.5, True, data=data)
    for user, true_class in reviews:
        review(Session, home, user, log_id, true_class)
    return log_id, next(iter(sha))


def test_reviewed_images_become_a_version_and_train_again_keeps_the_old_test_images(home, Session, lab):
    agreed = [reviewed_case(Session, home, lab, c, i, (ANA, c), (BO, c)) for i, c in enumerate(CLASSES)]
    disputed, _ = reviewed_case(Session, home, lab, "FL", 5, (ANA, "FL"), (BO, "MCL"))
    unsure, _ = reviewed_case(Session, home, lab, "MCL", 6, (ANA, None))
    with Session() as s:
        ready = to_data.ready_cases(s, home)
    assert sorted(r.log_id for r in ready) == sorted(i for i, _ in agreed)  # neither disputed nor unsure

    for log_ids, message in [([disputed], "all name one class"), ([unsure], "all name one class")]:
        with pytest.raises(UserError, match=message), Session.begin() as s:
            to_data.add_reviewed_cases(s, home, ANA, "lymphoma", log_ids)
    with pytest.raises(UserError, match="only editors"), Session.begin() as s:
        to_data.add_reviewed_cases(s, home, VIC, "lymphoma", [i for i, _ in agreed])
    with Session.begin() as s:
        added = to_data.add_reviewed_cases(s, home, ANA, "lymphoma", [i for i, _ in agreed], "March referrals")
    assert (added.version, set(added.added)) == (2, {sha for _, sha in agreed})
    with Session() as s:
        diff = versions.diff(s, "lymphoma", 1, 2)
        assert "March referrals" in versions.version_list(s, "lymphoma")[0].note
    assert not diff.removed and not diff.relabelled
    assert {(im.sha256, im.label, im.group) for im in diff.added} == {
        (sha, c, sha) for (_, sha), c in zip(agreed, CLASSES)
    }  # each with its reviewed class, its case its own group

    with pytest.raises(UserError, match="only editors"), Session.begin() as s:
        retrain.train_again(s, home, VIC, lab, 2)
    with Session.begin() as s:
        again = retrain.train_again(s, home, ANA, lab, 2)
    with Session() as s:
        old, new = s.get(Run, lab), s.get(Run, again)
        config = RunConfig.from_dict(new.config)
        assert (config.dataset_version, config.frozen_test_of_run) == (2, lab)
        old_parts, new_parts = split_parts(s, old.split, 0), split_parts(s, new.split, 0)
        old_test = {im.sha256 for im in old_parts["test"]}
        assert {im.sha256 for im in new_parts["test"]} == old_test  # exactly the old run's test images
        assert {sha for _, sha in agreed} <= {im.sha256 for im in new_parts["train"] + new_parts.get("val", [])}
        assert len(old_test) == 6 and new.split.params["version"] == 2


def test_the_two_runs_are_compared_on_the_old_runs_test_images(home, Session, lab):
    with Session.begin() as s:
        again = retrain.train_again(s, home, ANA, lab, 1)
    with Session() as s:
        assert [c.words for c in retrain.frozen_test_comparisons(s, lab)][0].startswith(f"Run {again} is queued")
    with Session.begin() as s:
        for run_id, right in [(lab, 3), (again, 5)]:
            run = s.get(Run, run_id)
            run.status = RunStatus.succeeded
            test = split_parts(s, run.split, 0)["test"]
            for k, image in enumerate(test):
                true = CLASSES.index(image.label)
                s.add(
                    Prediction(
                        run_id=run_id,
                        image_id=image.id,
                        true_label=true,
                        predicted_label=true if k < right else (true + 1) % 3,
                        probabilities=[1, 0, 0],
                    )
                )
    with Session() as s:
        (seen_from_old,) = retrain.frozen_test_comparisons(s, lab)
        (seen_from_new,) = retrain.frozen_test_comparisons(s, again)
    assert seen_from_old == seen_from_new
    c = seen_from_old
    assert (c.old_run, c.new_run, c.test_images, c.scored) == (lab, again, 6, 6)
    assert (c.old_accuracy, c.new_accuracy) == (pytest.approx(3 / 6), pytest.approx(5 / 6))
    assert c.paired.only_a == 2 and c.paired.only_b == 0
    assert f"Run {again} (trained again) scores 33.3 points above run {lab} on the same 6 test images" in c.words


def test_the_api_gives_the_queue_takes_reviews_and_answers_field_accuracy(home, Session, lab):
    """GET /reviews/queue, POST /reviews and GET /models/{run}/field, each answer held to the document."""
    from starlette.applications import Starlette

    from core.access import tokens
    from core.api.routes import api_routes
    from tests.openapi_check import CheckedClient

    settings = dataclasses.replace(home, auth_mode="password")
    ana, bo, vic = (tokens.add_token(settings.accounts_file, u.name, u.role)[1] for u in (ANA, BO, VIC))
    client = CheckedClient(Starlette(routes=api_routes(settings)), client=("203.0.113.5", 50000))

    def call(method: str, path: str, token: str, **kw):
        return client.request(method, f"/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, **kw)

    sure = log(Session, lab, "CLL", 0.9, False, data=png("CLL", 50))
    referred = log(Session, lab, "FL", 0.6, True, data=png("FL", 51))
    queue_now = call("GET", "/reviews/queue", ana, params={"run": lab})
    assert queue_now.status_code == 200
    assert [i["id"] for i in queue_now.json()["items"]] == [referred, sure]  # the referred one first
    assert call("GET", "/reviews/queue", vic).status_code == 403  # a viewer sees no queue
    assert call("POST", "/reviews", vic, json={"log_id": referred, "true_class": "FL"}).status_code == 403

    note = "<b>**looks FL**</b>"
    made = call("POST", "/reviews", ana, json={"log_id": referred, "true_class": "MCL", "note": note})
    assert made.status_code == 201 and made.json()["reviewer"] == "ana" and made.json()["note"] == note
    assert made.json()["blind"] is False  # not said: given seeing the model's answer
    blind = call("POST", "/reviews", bo, json={"log_id": referred, "true_class": "MCL", "blind": True})
    assert blind.status_code == 201 and blind.json()["blind"] is True
    assert call("POST", "/reviews", bo, json={"log_id": sure, "true_class": "CLL"}).status_code == 201
    refused = call("POST", "/reviews", ana, json={"log_id": sure, "true_class": "DLBCL"})
    assert refused.status_code == 422 and "not one of them" in refused.json()["error"]
    assert call("POST", "/reviews", ana, json={"log_id": "x", "true_class": None}).status_code == 422

    bo_queue = call("GET", "/reviews/queue", bo, params={"run": lab}).json()
    assert bo_queue["items"] == []  # bo reviewed both
    ana_queue = call("GET", "/reviews/queue", ana, params={"run": lab}).json()["items"]
    assert [(i["id"], [r["reviewer"] for r in i["reviews"]]) for i in ana_queue] == [(sure, ["bo"])]

    answer = call("GET", f"/models/{lab}/field", vic)  # figures of a model: any signed-in reader
    assert answer.status_code == 200
    got = answer.json()
    # Two cases, both agreed: the referred FL one was MCL (overruled twice), the sure CLL one right.
    assert (got["reviewed"], got["counted"], got["accuracy"], got["referred"], got["overruled"]) == (2, 2, 0.5, 1, 2)
    assert (got["class_reviews"], got["blind"]) == (3, 1)
    assert got["confusion"][CLASSES.index("MCL")][CLASSES.index("FL")] == 1
    with Session() as s:
        assert got == json.loads(json.dumps(field.field_accuracy(s, lab).to_json(), default=str))
    assert call("GET", "/models/999999/field", ana).status_code == 404


def test_the_command_line_gives_the_same_field_figures(home, Session, lab, monkeypatch, capsys):
    from core.__main__ import main

    monkeypatch.setenv("APP_HOME", str(home.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    right = log(Session, lab, "CLL", 0.9, False)
    wrong = log(Session, lab, "FL", 0.6, True)
    review(Session, home, ANA, right, "CLL", blind=True)
    review(Session, home, ANA, wrong, "MCL")
    with Session() as s:
        found = field.field_accuracy(s, lab)

    assert main(["field", str(lab), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(found.to_json(), default=str))
    assert main(["field", str(lab)]) == 0
    out = capsys.readouterr().out
    assert found.summary() in out and "50.0% referred" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.split("Confusion matrix")[1].splitlines()[2:5]}
    assert rows["CLL"] == ["1", "0", "0", "100.0%"] and rows["MCL"] == ["0", "1", "0", "0.0%"]  # the model said FL
    assert found.weeks[0].week.isoformat() in out.split("Week (Monday, UTC)")[1]
    assert main(["field", "999999"]) == 2
    assert "No run with id 999999" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_reviewer_sending_twice_at_once_leaves_one_review_the_later_one(backend, request, tmp_path):
    """Two requests of one reviewer about one prediction, the second sent while the first is still
    being written (two tabs, an API call sent again): neither fails, one review remains, the later."""
    import threading

    home = tmp_path / "home"
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{home}/app.db"
    settings = load_settings({"APP_HOME": str(home), "DATABASE_URL": url})
    Session = make_sessionmaker(url)
    log_id = log(Session, 1, "CLL", 0.5, True)
    failures: list[BaseException] = []

    def second() -> None:
        try:
            review(Session, settings, ANA, log_id, "MCL", "second")  # waits for the first one's row lock
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    with Session.begin() as s:
        store.record_review(s, settings, ANA, log_id, "FL", "first")
        other = threading.Thread(target=second)
        other.start()
        other.join(1.0)  # it cannot finish before this transaction ends
        assert other.is_alive()
    other.join(30)
    assert not failures, failures
    with Session() as s:
        (case,) = store.cases(s, log_ids=[log_id])
    assert [(r.reviewer, r.true_class, r.note) for r in case.reviews] == [("ana", "MCL", "second")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_review_read_before_another_was_written_still_replaces_it(backend, request, tmp_path):
    """The second request read the prediction before the first one's review was written, and writes
    after it: it is not refused for a stale read, and the later review stands."""
    home = tmp_path / "home"
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{home}/app.db"
    settings = load_settings({"APP_HOME": str(home), "DATABASE_URL": url})
    Session = make_sessionmaker(url)
    log_id = log(Session, 1, "CLL", 0.5, True)
    with Session.begin() as late:
        assert late.get(PredictionLog, log_id) is not None  # the second request's read
        review(Session, settings, ANA, log_id, "FL", "first")  # the first request, written and committed
        store.record_review(late, settings, ANA, log_id, "MCL", "second")
    with Session() as s:
        (case,) = store.cases(s, log_ids=[log_id])
    assert [(r.reviewer, r.true_class, r.note) for r in case.reviews] == [("ana", "MCL", "second")]


def test_a_cell_of_the_field_matrix_holds_exactly_its_agreed_cases(home, Session):
    data = png("FL", 60)
    kept = prediction_log.keep_for_review(home, [(hashlib.sha256(data).hexdigest(), data)])
    in_cell = log(Session, 3, "FL", 0.6, True, data=data)
    also = log(Session, 3, "FL", 0.7, False)  # the same cell, its image not kept
    right = log(Session, 3, "FL", 0.8, False)  # reviewed FL: another cell
    split = log(Session, 3, "FL", 0.5, True)  # reviewers disagree: in no cell
    for log_id, verdicts in (
        (in_cell, [(ANA, "MCL")]),
        (also, [(BO, "MCL")]),
        (right, [(ANA, "FL")]),
        (split, [(ANA, "MCL"), (BO, "CLL")]),
    ):
        for user, true_class in verdicts:
            review(Session, home, user, log_id, true_class)
    with Session() as s:
        cell = field.field_cell(s, home, ANA, 3, "MCL", "FL")
        assert {c.log_id for c in cell} == {in_cell, also}
        by_id = {c.log_id: c for c in cell}
        assert by_id[in_cell].image_path is not None and by_id[in_cell].image_path.read_bytes() == data and kept
        assert by_id[also].image_path is None and by_id[also].probabilities["FL"] == pytest.approx(0.7)
        assert field.field_cell(s, home, ANA, 3, "FL", "FL")[0].log_id == right
        with pytest.raises(UserError, match="editors"):
            field.field_cell(s, home, VIC, 3, "MCL", "FL")
