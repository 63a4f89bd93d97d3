"""Under a pipe or in a log file, fit and predict print a progress line every N seconds instead of a tqdm bar."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from neurolight.callbacks import LineProgress
from neurolight.cli.main import _lines_when_not_a_terminal


def test_line_progress__prints_fit_and_predict_lines_with_counts_and_metrics(tmp_path, capsys):
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, limit_predict_batches=3, logger=False,
        enable_checkpointing=False, callbacks=[LineProgress(interval_s=1e-9)], default_root_dir=tmp_path,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    trainer.predict(BoringModel(), return_predictions=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[fit] epoch 0, batch 1/4 (25%), ") and "ETA" in lines[0]
    assert any(line.startswith("[fit] epoch 0, batch 4/4 (100%)") for line in lines)
    assert lines[-1].startswith("[predict] batch 3/3 (100%), ") and "ETA" not in lines[-1]
    assert not any(line.startswith("[validate]") for line in lines)  # fit's own validation prints nothing


def test_line_progress__prints_lines_for_a_validate_run_on_its_own(tmp_path, capsys):
    trainer = pl.Trainer(limit_val_batches=5, logger=False, callbacks=[LineProgress(interval_s=1e-9)],
                         default_root_dir=tmp_path, enable_model_summary=False)  # fmt: skip
    trainer.validate(BoringModel(), verbose=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[validate] batch 1/5 (20%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("[validate] batch 5/5 (100%), ")


def test_cli__swaps_the_tqdm_bar_for_lines_when_stderr_is_not_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROLIGHT_PROGRESS_SECONDS", "7")
    trainer = pl.Trainer(callbacks=[TQDMProgressBar(refresh_rate=5)], logger=False, default_root_dir=tmp_path)
    _lines_when_not_a_terminal(trainer)  # pytest captures stderr: not a terminal
    assert isinstance(trainer.progress_bar_callback, LineProgress) and trainer.progress_bar_callback.interval_s == 7


def test_cli__swaps_lightnings_default_bar_too(tmp_path):
    # A recipe that names no bar gets Lightning's default, Rich where rich is installed: a piped run printed nothing.
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path)
    _lines_when_not_a_terminal(trainer)
    assert isinstance(trainer.progress_bar_callback, LineProgress)
