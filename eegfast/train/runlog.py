"""Per-run scalar logging on rank 0: ``metrics.csv`` and TensorBoard event files."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from eegfast.fileio import write_text_atomic


class RunLogger:
    """Appends one CSV row per logged step (``step, tag, value``) and mirrors it to TensorBoard.

    The long CSV layout (one scalar per row) lets every command log whatever scalars it has.
    On ranks other than 0 all methods do nothing.

    ``resume_step``: the optimiser step a resumed run continues from. What the earlier run
    logged after it (steps it went on to before it stopped, which the resumed run logs again,
    or never reaches) is dropped from ``metrics.csv`` and purged from TensorBoard, so that each
    step is there once, from the run that the checkpoints continue.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            _drop_rows_after(self.path, resume_step)
        # An empty file is new too: a run killed before its first log point (SIGTERM, SIGKILL:
        # no close) left it so, and rows appended without the header made read_metrics fail.
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "tag", "value"])
            self._file.flush()  # on disk at once, whatever stops the run before its first log
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier events from that step on.
            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(
                log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge
            )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._csv.writerow([step, tag, f"{float(value):.8g}"])
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), step)
        self._file.flush()

    def flush(self) -> None:
        """Put everything logged so far on disk: called before each checkpoint, so that a run
        killed right after one loses none of the scalars up to its step (TensorBoard's writer
        thread writes events some time after they are logged, and a resume purges only the
        steps after the checkpoint's)."""
        if not self.enabled:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the rows of steps after ``step``."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    out = io.StringIO()
    csv.writer(out).writerows(kept)
    write_text_atomic(path, out.getvalue())


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> {tag: [(step, value), ...]} (later rows for a step win on resume)."""
    series: dict[str, dict[int, float]] = {}
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            series.setdefault(row["tag"], {})[int(row["step"])] = float(row["value"])
    return {tag: sorted(points.items()) for tag, points in series.items()}
