"""Report: markdown tables (one row per method) and a non-empty PNG, from real metric objects."""

import pytest

from lvlm_fix.evals.bootstrap import Delta
from lvlm_fix.evals.chair import ChairConfig, evaluate_chair, make_extractor
from lvlm_fix.evals.pope import pope_metrics
from lvlm_fix.evals.report import MethodRow, markdown_report, method_metrics, write_report


def _rows():
    ex = make_extractor(ChairConfig())
    gt = {1: {"person", "dog"}}
    greedy_chair = evaluate_chair([(1, "A man with a dog and a cat.")], gt, ex).summary
    vcd_chair = evaluate_chair([(1, "A man with a dog.")], gt, ex).summary
    labels = [1, 1, 0, 0]
    greedy = method_metrics(
        pope={"coco_random": pope_metrics(labels, [1, 1, 1, 0]),
              "coco_adversarial": pope_metrics(labels, [1, 1, 1, 1])},
        chair=greedy_chair,
    )  # fmt: skip
    vcd = method_metrics(pope={"coco_random": pope_metrics(labels, [1, 0, 0, 0])}, chair=vcd_chair)
    return [
        MethodRow(name="greedy", config_hash="a1b2c3", metrics=greedy),
        MethodRow(name="vcd", config_hash="d4e5f6", metrics=vcd),
    ]


def test_markdown_tables():
    md = markdown_report(_rows(), title="COCO")
    lines = md.splitlines()
    # Splits in canonical order, random before adversarial.
    assert lines.index("## POPE: coco_random") < lines.index("## POPE: coco_adversarial")
    assert "| Method | Config | Acc | Prec | Rec | F1 | Yes |" in lines
    assert "| greedy | `a1b2c3` | 75.00 | 66.67 | 100.00 | 80.00 | 75.00 |" in lines
    assert "| vcd | `d4e5f6` | 75.00 | 100.00 | 50.00 | 66.67 | 25.00 |" in lines
    assert "| vcd | `d4e5f6` | – | – | – | – | – |" in lines  # no adversarial run
    assert "| greedy | `a1b2c3` | 100.0 | 33.3 | 100.0 | 9.0 |" in lines
    assert "| vcd | `d4e5f6` | 0.0 | 0.0 | 100.0 | 6.0 |" in lines


def test_difference_columns_and_noise_mark():
    greedy, vcd = _rows()
    clear = Delta(diff=0.25, lo=0.1, hi=0.4)
    noise = Delta(diff=-0.05, lo=-0.2, hi=0.1)
    chair = Delta(diff=-33.3, lo=-50.0, hi=0.0)  # touches 0: still within noise
    deltas = {"pope/coco_random/acc": clear, "pope/coco_random/f1": noise, "chair/chair_s": chair}
    md = markdown_report([greedy, vcd.model_copy(update={"deltas": deltas})], resamples=500)
    lines = md.splitlines()
    header = "| Method | Config | Acc | Prec | Rec | F1 | Yes | ΔAcc [95% CI] | ΔF1 [95% CI] |"
    assert header in lines
    assert "| greedy | `a1b2c3` | 75.00 | 66.67 | 100.00 | 80.00 | 75.00 | – | – |" in lines
    assert (
        "| vcd | `d4e5f6` | 75.00 | 100.00 | 50.00 | 66.67 | 25.00 | +25.00 [+10.00, +40.00] "
        "| -5.00 [-20.00, +10.00] ~ |"
    ) in lines
    assert "| vcd | `d4e5f6` | 0.0 | 0.0 | 100.0 | 6.0 | -33.3 [-50.0, +0.0] ~ |" in lines
    assert md.count("~ marks a difference whose interval contains 0") == 3  # under every table
    assert "500 resamples of the images" in md
    assert "Δ" not in markdown_report(_rows())  # no deltas, no columns and no note


def test_write_report_files(tmp_path):
    md, png = write_report(_rows(), tmp_path / "out")
    assert md.read_text().count("| Method | Config |") == 3
    assert "![methods](report.png)" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_rows():
    with pytest.raises(ValueError, match="no method rows"):
        markdown_report([])
    row = MethodRow(name="x", config_hash="h", metrics={"pope/coco_random/accuracy": 0.5})
    with pytest.raises(ValueError, match="unknown metric key"):
        markdown_report([row])
    dup = MethodRow(name="x", config_hash="h", metrics={})
    with pytest.raises(ValueError, match="duplicate method names"):
        markdown_report([dup, dup])
