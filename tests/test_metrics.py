import numpy as np
import pytest
from scipy import stats

from fusion_jax.metrics import (UNCONVERGED_LOSS, binary_metrics, holm, mean_std, paired_difference, unconverged,
                                unconverged_runs)


def test_metrics_by_hand():
    # 6 TP, 2 FP, 3 FN, 9 TN: accuracy 15/20, precision 6/8, recall 6/9, F1 = 2PR/(P+R) = 12/17.
    m = binary_metrics(6, 2, 3, 9)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(12 / 17)
    assert m["majority_baseline"] == pytest.approx(11 / 20)  # 9 positives, 11 negatives


def test_no_positive_predictions():
    m = binary_metrics(0, 0, 5, 15)
    assert m["accuracy"] == pytest.approx(0.75)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["majority_baseline"] == pytest.approx(0.75)


def test_all_one_class():
    m = binary_metrics(10, 0, 0, 0)  # every label and prediction positive
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["majority_baseline"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    m = binary_metrics(0, 4, 0, 0)  # every label negative, every prediction positive
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["majority_baseline"] == 1.0


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        binary_metrics(0, 0, 0, 0)


def test_mean_std_uses_sample_std():
    assert mean_std([0.7, 0.8, 0.9]) == (pytest.approx(0.8), pytest.approx(0.1))
    assert mean_std([0.5]) == (0.5, None)


def test_paired_difference():
    a, b = [0.90, 0.85, 0.88], [0.80, 0.83, 0.81]
    diff, p = paired_difference(a, b)
    assert diff == pytest.approx(np.mean(np.subtract(a, b)))
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert paired_difference([0.9], [0.8])[1] is None
    assert paired_difference([0.9, 0.8], [0.8, 0.7])[1] is None  # identical differences: no test
    assert paired_difference([0.9, 0.8], [0.8, 0.75])[1] == pytest.approx(stats.ttest_rel([0.9, 0.8], [0.8, 0.75]).pvalue)


def test_holm_adjusted_p_values():
    """R's p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") = 0.05, 0.08, 0.09, 0.09, 0.09, in any order;
    None stays out of the family."""
    np.testing.assert_allclose(holm([0.01, 0.02, 0.03, 0.04, 0.05]), [0.05, 0.08, 0.09, 0.09, 0.09])
    np.testing.assert_allclose(holm([0.05, 0.03, 0.01, 0.04, 0.02]), [0.09, 0.09, 0.05, 0.09, 0.08])
    assert holm([0.02, None, 0.5]) == [0.04, None, 0.5]
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([None]) == [None] and holm([]) == []
    assert holm([0.03]) == [0.03] and holm([0.02, 0.0]) == [0.02, 0.0] and holm([1.0]) == [1.0]  # the ends of [0, 1]


def test_unconverged_is_a_final_loss_above_twice_a_guess_or_not_finite():
    assert UNCONVERGED_LOSS == pytest.approx(2 * np.log(2))
    assert not unconverged(0.2) and not unconverged(np.log(2)) and not unconverged(UNCONVERGED_LOSS)
    assert unconverged(1.4) and unconverged(4e13) and unconverged(None) and unconverged(float("nan"))


def test_unconverged_runs_counts_them_and_names_the_worst():
    assert unconverged_runs([0.2, 0.69]) == (0, "") and unconverged_runs([]) == (0, "")
    assert unconverged_runs([0.2, 1.4, 4e13]) == (2, "up to 4e+13")
    assert unconverged_runs([None, float("inf"), 0.3]) == (2, "not finite in 2")
    assert unconverged_runs([3.0, None, 0.1]) == (2, "up to 3, not finite in 1")


def test_holm_refuses_what_is_not_a_p_value():
    for bad in ([0.01, float("nan")], [1.5], [-0.1, 0.2]):
        with pytest.raises(ValueError, match="p-values lie in"):
            holm(bad)
