"""Per-run scalar logging on rank 0: ``metrics.csv`` and TensorBoard event files."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from eegfast.fileio import write_text_atomic

HEADER = ["step", "tag", "value"]  # metrics.csv's first line


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
        self._file = self.path.open("a", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(HEADER)
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


def _read_rows(path: Path) -> tuple[list[list[str]], int, bool]:
    """``path``'s data rows ``step, tag, value`` (integer step, a number) in order, how many
    other rows it has besides the header, and whether it is clean: the header first (files an
    older eegfast appended to lack it) and nothing set aside. A last row without its line end
    is set aside: the tail of a write cut short (a run killed while it wrote, or the zeros a
    file system may leave after a power loss: only the rows up to the last checkpoint are
    synced), or of one in progress."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    cut = bool(rows) and not text.endswith(("\n", "\r"))
    if cut:
        rows = rows[:-1]
    header = bool(rows) and rows[0] == HEADER
    if header:
        rows = rows[1:]
    data = [row for row in rows if _row_step(row) is not None]
    bad = len(rows) - len(data)
    return data, bad, header and not bad and not cut


def _row_step(row: list[str]) -> int | None:
    """The step of a data row ``step, tag, value``; None for anything else."""
    if len(row) != 3:
        return None
    try:
        float(row[2])
        return int(row[0])
    except ValueError:
        return None


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) with the header and the rows of steps up to ``step``
    only: the later ones, and the rows that do not read (:func:`_read_rows`), which the
    resumed run made worse: rows of zeros made it fail (no integer step), and its first row
    was appended to a cut one's line (a cut "3" then "21,train/loss,0.9" read as step 321)."""
    rows, _, clean = _read_rows(path)
    kept = [row for row in rows if int(row[0]) <= step]
    if clean and len(kept) == len(rows):
        return
    out = io.StringIO()
    csv.writer(out).writerows([HEADER, *kept])
    write_text_atomic(path, out.getvalue())


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> {tag: [(step, value), ...]} (later rows for a step win on resume).
    A last row cut short (a run killed while it wrote it, or writing it now) is left out;
    other rows that are not ``step, tag, value`` are refused, naming the file."""
    path = Path(path)
    rows, bad, _ = _read_rows(path)
    if bad:
        raise ValueError(
            f"{path}: {bad} row(s) are not step,tag,value with an integer step and a number; "
            "is it a run's metrics.csv?"
        )
    series: dict[str, dict[int, float]] = {}
    for step, tag, value in rows:
        series.setdefault(tag, {})[int(step)] = float(value)
    return {tag: sorted(points.items()) for tag, points in series.items()}
