"""Evaluation and training-curve charts are written as PNG files."""
from __future__ import annotations

import pytest

from model.errors import ConfigError
from model.evaluate import EvalResult
from model.plots import check_format, plot_eval_table, plot_training_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_eval_table_plot_writes_a_png(tmp_path):
    res = EvalResult("last-session", 100, {
        "pop": {"recall@20": 0.41, "mrr@20": 0.11, "ndcg@20": 0.18},
        "hrnn": {"recall@20": 0.9, "mrr@20": 0.7, "ndcg@20": 0.75},
    })
    out = plot_eval_table(res, tmp_path / "sub" / "eval.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_training_curve_plot_writes_a_png_and_tolerates_missing_values(tmp_path):
    history = [{"epoch": 1, "loss": 6.0, "events_per_s": 1000.0},
               {"epoch": 2, "loss": 5.1, "val_mrr@20": 0.4},
               {"epoch": 3, "loss": 4.7, "val_mrr@20": 0.45}]
    data = plot_training_curve(history, tmp_path / "curve.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert plot_training_curve([], tmp_path / "empty.png").exists()


def test_training_curve_draws_the_refit_loss_beside_the_early_stopping_run(tmp_path):
    history = [{"epoch": 1, "loss": 6.0, "val_mrr@20": 0.4}, {"epoch": 2, "loss": 5.1, "val_mrr@20": 0.45}]
    plain = plot_training_curve(history, tmp_path / "plain.png").read_bytes()
    refit = [{"epoch": 1, "loss": 5.8}, {"epoch": 2, "loss": 4.9}]
    both = plot_training_curve(history, tmp_path / "refit.png", refit=refit).read_bytes()
    assert both.startswith(PNG_MAGIC) and both != plain


def test_training_curve_marks_the_calibrated_validation_level(tmp_path):
    history = [{"epoch": 1, "loss": 6.0, "val_mrr@20": 0.4}, {"epoch": 2, "loss": 5.1, "val_mrr@20": 0.45}]
    plain = plot_training_curve(history, tmp_path / "plain.png").read_bytes()
    marked = plot_training_curve(history, tmp_path / "calibrated.png", calibrated=(4.0, 0.46)).read_bytes()
    assert marked.startswith(PNG_MAGIC) and marked != plain


def test_a_chart_path_is_refused_unless_its_extension_names_a_format_matplotlib_writes(tmp_path):
    for fine in ("eval.png", "eval.PNG", "eval.pdf", "eval.svg"):
        check_format(tmp_path / fine, "--plot")
    for bad, found in (("eval.txt", "cannot write '.txt' files"), ("eval", "no extension names the format")):
        with pytest.raises(ConfigError, match=found) as err:
            check_format(tmp_path / bad, "--plot")
        assert str(err.value).startswith(f"--plot {tmp_path / bad}: ") and ".png, " in str(err.value)
