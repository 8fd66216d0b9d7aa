import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftlab.evaluate.metrics import classification_metrics


def test_hand_computed_example():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(labels, preds, 3)
    # class 0: P 2/2 R 2/3; class 1: P 1/2 R 1/2; class 2: P 1/2 R 1/1
    p = [1, 0.5, 0.5]
    r = [2 / 3, 0.5, 1]
    f = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(sum(p) / 3)
    assert m["recall"] == pytest.approx(sum(r) / 3)
    assert m["f1"] == pytest.approx(sum(f) / 3)
    assert m["examples"] == 6


def test_a_class_never_predicted_has_zero_precision():
    m = classification_metrics([0, 1, 1, 1], [1, 1, 1, 1], 2)
    assert m["precision"] == pytest.approx((0 + 0.75) / 2)
    assert m["recall"] == pytest.approx((0 + 1) / 2)


def brute_force(labels, preds, k):
    present = [c for c in range(k) if c in labels or c in preds]
    ps, rs, fs = [], [], []
    for c in present:
        tp = sum(1 for y, p in zip(labels, preds, strict=True) if y == c and p == c)
        npred = sum(1 for p in preds if p == c)
        nact = sum(1 for y in labels if y == c)
        prec = tp / npred if npred else 0.0
        rec = tp / nact if nact else 0.0
        ps.append(prec)
        rs.append(rec)
        fs.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    acc = sum(1 for y, p in zip(labels, preds, strict=True) if y == p) / len(labels)
    return acc, sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


@given(
    st.integers(2, 5).flatmap(
        lambda k: st.tuples(
            st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60)
        )
    )
)
def test_matches_a_brute_force_count(case):
    k, pairs = case
    labels = [y for y, _ in pairs]
    preds = [p for _, p in pairs]
    m = classification_metrics(labels, preds, k)
    acc, p, r, f = brute_force(labels, preds, k)
    assert m["accuracy"] == pytest.approx(acc)
    assert m["precision"] == pytest.approx(p)
    assert m["recall"] == pytest.approx(r)
    assert m["f1"] == pytest.approx(f)
