"""Per-run scalar logging on rank 0: ``metrics.csv`` and TensorBoard event files."""

from __future__ import annotations

import csv
from pathlib import Path


class RunLogger:
    """Appends one CSV row per logged step (``step, tag, value``) and mirrors it to TensorBoard.

    The long CSV layout (one scalar per row) lets every command log whatever scalars it has.
    On ranks other than 0 all methods do nothing.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "tag", "value"])
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._csv.writerow([step, tag, f"{float(value):.8g}"])
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), step)
        self._file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> {tag: [(step, value), ...]} (later rows for a step win on resume)."""
    series: dict[str, dict[int, float]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            series.setdefault(row["tag"], {})[int(row["step"])] = float(row["value"])
    return {tag: sorted(points.items()) for tag, points in series.items()}
