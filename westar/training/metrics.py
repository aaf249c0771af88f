"""metrics.csv and TensorBoard of a training run."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

__all__ = ["MetricsLogger", "CSV_FIELDS"]

CSV_FIELDS = ("step", "lr", "loss", "st", "weak", "reg", "heldout_acc", "seconds")


class MetricsLogger:
    """metrics.csv (rows after a resumed step are dropped) and TensorBoard if installed."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool):
        self.path = output_dir / "metrics.csv"
        rows, broken = [], 0
        if self.path.is_file():
            with self.path.open(newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        step = int(row["step"])
                    except (KeyError, TypeError, ValueError):
                        broken += 1
                        continue
                    if step <= start_step and None not in row and None not in row.values():
                        rows.append(row)
                    elif step <= start_step:
                        broken += 1
        if broken:
            warnings.warn(f"{self.path}: dropped {broken} unreadable rows", stacklevel=3)
        self.file = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "st", "weak", "reg", "lr", "heldout_acc"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
