import numpy as np
import pytest

from core.evaluation.metrics import format_report, report_from_labels, summarise_folds


def test_table_matches_a_hand_computed_example():
    # 10 samples, 3 classes.
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    # Confusion (rows true): [[3,1,0],[0,2,1],[1,0,2]]
    r = report_from_labels(y_true, y_pred, ["CLL", "FL", "MCL"])
    assert r.confusion.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert r.accuracy == pytest.approx(7 / 10)
    cll, fl, mcl = r.rows
    # CLL: TP 3, FP 1 (an MCL), FN 1, TN 5 -> precision 3/4, recall 3/4, one-vs-rest accuracy 8/10
    assert (cll.precision, cll.recall, cll.f1, cll.accuracy, cll.support) == pytest.approx((0.75, 0.75, 0.75, 0.8, 4))
    # FL: TP 2, FP 1, FN 1, TN 6 -> 2/3, 2/3, accuracy 8/10
    assert (fl.precision, fl.recall, fl.f1, fl.accuracy, fl.support) == pytest.approx((2 / 3, 2 / 3, 2 / 3, 0.8, 3))
    # MCL: TP 2, FP 1, FN 1, TN 6
    assert (mcl.precision, mcl.recall, mcl.accuracy) == pytest.approx((2 / 3, 2 / 3, 0.8))
    text = format_report(r)
    assert "Precision" in text and "Support" in text and "0.7000" in text


def test_class_never_predicted_has_zero_precision_not_an_error():
    r = report_from_labels([0, 1, 1], [1, 1, 1], ["A", "B"])
    assert r.rows[0].precision == 0 and r.rows[0].recall == 0
    assert r.rows[1].recall == 1


def test_fold_summary_is_mean_and_sample_sd():
    a = report_from_labels([0, 1, 0, 1], [0, 1, 0, 1], ["A", "B"])  # 1.0
    b = report_from_labels([0, 1, 0, 1], [0, 0, 0, 1], ["A", "B"])  # 0.75
    s = summarise_folds([a, b])
    assert s.accuracy_mean == pytest.approx(0.875)
    assert s.accuracy_std == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert s.rows[1]["recall_mean"] == pytest.approx(0.75)
