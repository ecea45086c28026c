"""Paired bootstrap intervals of "method minus baseline" (evals/bootstrap.py)."""

import numpy as np
import pytest

from lvlm_fix.evals.bootstrap import SampleSet, compare, compare_rows, resample_weights
from lvlm_fix.evals.chair import ChairConfig, evaluate_chair, make_extractor
from lvlm_fix.evals.chair_task import chair_sample_set
from lvlm_fix.evals.pope import pope_counts
from lvlm_fix.evals.protocols import pope_rates


def pope_set(labels, preds, split="s") -> SampleSet:
    def acc(counts):
        return pope_rates("official", counts)["acc"]

    def f1(counts):
        return pope_rates("official", counts)["f1"]

    metrics = {f"pope/{split}/acc": acc, f"pope/{split}/f1": f1}
    return SampleSet(split, pope_counts(labels, preds), metrics)


def mean_set(values) -> SampleSet:
    """Columns [x, 1]: the metric sum(x)/count is the mean of x over the resample."""
    counts = np.stack([np.asarray(values, dtype=float), np.ones(len(values))], axis=1)
    return SampleSet("m", counts, {"mean": lambda sums: sums[..., 0] / sums[..., 1]})


def test_weights_are_resamples_with_replacement():
    w = resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all() and (w >= 0).all()
    assert (w == resample_weights(7, 50, seed=3)).all()


def test_row_against_itself_is_exactly_zero():
    labels = [1, 0] * 10
    row = pope_set(labels, [1, 1, 0, 0, 1] * 4)
    for delta in compare(row, row, resamples=200, seed=0).values():
        assert (delta.diff, delta.lo, delta.hi) == (0.0, 0.0, 0.0)
        assert delta.within_noise


def test_constant_paired_difference_gives_that_constant():
    """Every sample moves by +0.25, so every resample's difference is exactly 0.25."""
    delta = compare(mean_set([0.0] * 8), mean_set([0.25] * 8), resamples=300, seed=1)["mean"]
    assert (delta.diff, delta.lo, delta.hi) == (0.25, 0.25, 0.25)
    assert not delta.within_noise


def test_clear_difference_is_significant():
    """200 questions: the baseline answers every question yes (acc 0.5), the method is right on
    180 (acc 0.9)."""
    labels = [1, 0] * 100
    method_preds = [y if i % 10 else 1 - y for i, y in enumerate(labels)]
    deltas = compare(pope_set(labels, [1] * 200), pope_set(labels, method_preds), 1000, seed=0)
    acc = deltas["pope/s/acc"]
    assert acc.diff == pytest.approx(0.4)
    assert 0.3 < acc.lo < acc.diff < acc.hi < 0.5 and not acc.within_noise


def test_tiny_difference_on_few_samples_is_noise():
    """10 questions, the method fixes one answer: +0.1 accuracy, but inside the noise."""
    labels = [1, 0] * 5
    base = [1, 0, 1, 0, 1, 0, 1, 0, 0, 1]
    method = [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    acc = compare(pope_set(labels, base), pope_set(labels, method), 1000, seed=0)["pope/s/acc"]
    assert acc.diff == pytest.approx(0.1)
    assert acc.lo == 0.0 and acc.hi > 0 and acc.within_noise


def test_deterministic_under_a_seed():
    rng = np.random.default_rng(5)
    a, b = mean_set(rng.random(40)), mean_set(rng.random(40))
    assert compare(a, b, 500, seed=7) == compare(a, b, 500, seed=7)
    assert compare(a, b, 500, seed=7) != compare(a, b, 500, seed=8)


def test_chair_sets_reproduce_the_reported_metrics():
    """The bootstrap's CHAIR formulas on all images equal evaluate_chair's headline numbers."""
    ex = make_extractor(ChairConfig())
    gt = {1: {"person", "dog"}, 2: {"cat"}, 3: {"car"}}
    base = evaluate_chair([(1, "A man with a dog."), (2, "A cat on a bed."), (3, "A car.")], gt, ex)
    vcd = evaluate_chair([(1, "A man with a dog."), (2, "A cat."), (3, "A car and a bus.")], gt, ex)
    base_set, vcd_set = chair_sample_set(base.captions), chair_sample_set(vcd.captions)
    sums = base_set.counts.sum(axis=0)
    assert base_set.metrics["chair/chair_s"](sums) == pytest.approx(base.summary.chair_s)
    assert base_set.metrics["chair/chair_i"](sums) == pytest.approx(base.summary.chair_i)
    deltas = compare_rows([base_set], [vcd_set], 200, seed=0)
    assert deltas["chair/chair_s"].diff == pytest.approx(vcd.summary.chair_s - base.summary.chair_s)
    assert deltas["chair/chair_i"].diff == pytest.approx(vcd.summary.chair_i - base.summary.chair_i)


def test_rows_must_share_samples():
    with pytest.raises(ValueError, match="same samples"):
        compare(mean_set([0.0] * 3), mean_set([0.0] * 4), 10, seed=0)
