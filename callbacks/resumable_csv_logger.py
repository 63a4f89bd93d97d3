"""ResumableCSVLogger: Lightning's CSVLogger, but a resumed run keeps the metrics history of the run it continues.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it opens the folder, so ``--ckpt_path`` into the same
version lost every row from before the resume. This writer adopts the file and its columns instead. The rows that the
stopped run logged after the checkpoint it resumes from are logged again by the resumed run: at its first write, the
rows at or after its first step are dropped from the file, so each step appears once.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepHistoryWriter(ExperimentWriter):
    _resumed_rows: list[dict] | None = None

    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes metrics.csv here; this one adopts its rows and columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._resumed_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._resumed_rows is not None and self.metrics:
            first_step = min(int(row["step"]) for row in self.metrics)
            kept = [row for row in self._resumed_rows if not row.get("step") or int(row["step"]) < first_step]
            self._record_new_keys()
            temporary = f"{self.metrics_file_path}.tmp"
            with self._fs.open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(temporary, self.metrics_file_path)
            self._resumed_rows = None
        super().save()


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resume.

    Args:
        save_dir: Folder of the logs; a run's files go to ``<save_dir>/<name>/version_<version>``.
        name: Experiment name (a folder under ``save_dir``).
        version: Run version; default: the next free ``version_N``. Give the stopped run's version to resume into
            its folder and keep its metrics.
        prefix: String put at the beginning of metric keys.
        flush_logs_every_n_steps: How often to flush the rows to ``metrics.csv``.
    """

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepHistoryWriter(log_dir=self.log_dir)
        return self._experiment
