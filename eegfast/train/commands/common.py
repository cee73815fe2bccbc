"""Arguments and set-up shared by the training commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and the training loop are imported where a run starts (``start``): the commands'
# options (``add_run_arguments``) are read from here for ``--help`` and usage errors, which
# print without loading them.
from eegfast.train.config import ConfigError, RunConfig, resolve_config, valid_keys
from eegfast.train.plots import REPORT_PLOTS

if TYPE_CHECKING:
    import torch

    from eegfast.train.distributed import DistInfo

EPILOG = (
    "Configuration: defaults, then --config FILE (.toml/.yaml), then the options that set a "
    "key (--seed, ...), then --set key=value (repeatable; later wins). Run under "
    "`torchrun --nproc_per_node N -m eegfast ...` for several processes/GPUs. "
    "Valid keys: " + ", ".join(valid_keys())
)


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    data: bool = True,
    training: bool = True,
    resume_folders: bool = True,
) -> None:
    """The options every training command shares. ``training=False``: no --resume or
    --overwrite (evaluate, predict); ``resume_folders=False``: --resume takes only ``auto``
    (finetune, whose folds and variants each resume their own folder under --out)."""
    parser.epilog = EPILOG
    if data:
        parser.add_argument(
            "--data",
            nargs="+",
            metavar="FOLDER",
            help="prepared folder(s) from `eegfast prepare` (sets data.roots)",
        )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=1e-3",
    )
    if training:  # (evaluate trains nothing: it took --resume and ignored it)
        if resume_folders:
            parser.add_argument(
                "--resume",
                default=None,
                metavar="auto|CHECKPOINT|RUN",
                help="resume: 'auto' = newest checkpoint in --out, a checkpoint folder "
                "(RUN/checkpoints/step-N), or a run folder (its newest checkpoint)",
            )
        else:
            parser.add_argument(
                "--resume",
                default=None,
                metavar="auto",
                help="'auto': continue each fold and variant from its newest checkpoint under "
                "--out (no other value: they resume their own folders)",
            )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the checkpoints and metrics of an earlier run in --out",
        )
    train = RunConfig().train  # (no command changes these defaults)
    parser.add_argument(
        "--seed", type=int, default=None, help=f"sets train.seed (default {train.seed})"
    )
    parser.add_argument(
        "--device", default=None, help=f"auto|cpu|cuda (sets train.device; default {train.device})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def resolve(args: argparse.Namespace, defaults: RunConfig, extra: dict[str, Any] | None = None):
    """The run's config: command defaults, file, command-line flags, then --set."""
    flags: dict[str, Any] = dict(extra or {})
    if getattr(args, "data", None):
        flags["data.roots"] = [str(p) for p in args.data]
    if args.seed is not None:
        flags["train.seed"] = args.seed
    if args.device is not None:
        flags["train.device"] = args.device
    if args.no_progress:
        flags["train.progress"] = False
    try:
        return resolve_config(defaults, args.config, args.overrides, flags=flags)
    except ConfigError as err:
        raise CommandError(str(err)) from None


def model_for_resume(
    config: RunConfig, defaults: RunConfig, resumed: dict[str, Any], *, named: bool = False
) -> RunConfig:
    """``config`` with the model a resumed run trains (``defaults``: the command's;
    ``resumed``: the checkpoint's meta, {} for a new run; ``named``: ``--model`` was given).

    A resume that names no model (``model.name`` left at the command's default) continues the
    run's model: the default would build another size, whose weights do not fit the
    checkpoint. Another model named explicitly (``--model``, a config file or ``--set``) is
    refused.
    """
    recorded = (resumed.get("arch") or {}).get("name")
    if not recorded or recorded == config.model.name:
        return config
    if named or config.model.name != defaults.model.name:
        raise CommandError(
            f"--model {config.model.name}: the run being resumed trains {recorded}; resume "
            "it without --model (or with that one), or start a new run (--overwrite or another "
            "--out)"
        )
    return config.with_overrides({"model.name": recorded})


@dataclass
class Runtime:
    device: torch.device
    dist: DistInfo


def start(config: RunConfig) -> Runtime:
    """Device, process group (under torchrun) and seeds."""
    from eegfast.train.distributed import choose_device, init_distributed
    from eegfast.train.engine import check_compile_support, seed_everything

    device = choose_device(config.train.device)
    if config.train.compile:  # before data, tokenizer or folds are loaded
        check_compile_support(device)
    info = init_distributed(device)
    seed_everything(config.train.seed, deterministic=config.train.deterministic)
    return Runtime(device, info)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command (a scheduler preempting the job, ``timeout``, ``kill``): the
    command stops as on Ctrl-C (the run's logs closed, one line saying where training stopped
    and how to continue), with the shell's status for SIGTERM."""


SIGTERM_STATUS = 128 + signal.SIGTERM  # 143


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def was_terminated(interrupt: BaseException) -> bool:
    """Whether ``interrupt`` is, or was raised while handling, a :class:`Terminated`."""
    seen: BaseException | None = interrupt
    while seen is not None:
        if isinstance(seen, Terminated):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block (the main thread only, and only where
    nothing else handles SIGTERM: an outer command, or a program embedding this one, keeps its
    own handler). Without it SIGTERM ended the process at once: no line saying where training
    stopped, and the TensorBoard writer's queue lost."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(name: str, body) -> int:
    """Call ``body()``; user errors become one line on stderr and exit status 2, Ctrl-C one
    line (where training stopped, how to continue) and exit status 130, SIGTERM the same line
    and status 143."""
    from eegfast.train.engine import NonFiniteLossError

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # one line, as the command's other messages (not Python's file:line + source line)
        kind = "warning" if category is UserWarning else category.__name__
        print(f"eegfast {name}: {kind}: {message}", file=sys.stderr)

    try:
        with _sigterm_as_interrupt(), warnings.catch_warnings():
            warnings.showwarning = show
            return int(body() or 0)
    except KeyboardInterrupt as err:
        print(f"eegfast {name}: {interrupted_message(err)}", file=sys.stderr)
        return SIGTERM_STATUS if was_terminated(err) else 130
    except (CommandError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"eegfast {name}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed (disk full): one line, not a traceback
        print(f"eegfast {name}: {err}", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        print(f"eegfast {name}: {err}", file=sys.stderr)
        return 3


def say(runtime: Runtime | None, *parts: object) -> None:
    """Print on rank 0 only (CLI output)."""
    if runtime is None or runtime.dist.is_main:
        print(*parts, flush=True)


def interrupted_message(interrupt: KeyboardInterrupt) -> str:
    """Where a Ctrl-C stopped training (a :class:`~eegfast.train.engine.TrainingInterrupted`
    knows the step and run folder) and how to continue from the last checkpoint."""
    from eegfast.train import checkpoint as ckpt
    from eegfast.train.engine import TrainingInterrupted

    if not isinstance(interrupt, TrainingInterrupted):
        return "interrupted"
    where = f"interrupted at step {interrupt.step}"
    latest = ckpt.latest_checkpoint(Path(interrupt.run_dir) / "checkpoints")
    if latest is None:
        return f"{where}; no checkpoint written yet in {interrupt.run_dir}"
    return f"{where}; last checkpoint {latest.path}; continue with --resume auto"


# --- the run folder: --out, --resume, --overwrite and the writer's lock ---------------------

# What a run leaves in its folder (and, for finetune, in FOLD/VARIANT/ below it): these are
# what --overwrite removes; nothing else in --out is touched.
RUN_ARTEFACTS = ("checkpoints", "metrics.csv", "tensorboard", "config.yaml")
# finetune's and evaluate's reports at the top of --out.
REPORT_ARTEFACTS = (
    "results.csv",
    "summary.json",
    "report.md",
    "predictions.npz",
    "predictions.csv",
    *REPORT_PLOTS,
)
LOCK = ".lock"


def check_out(out: Path) -> None:
    """``--out`` must be a folder or not exist yet."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")


def _run_folders(out: Path) -> list[Path]:
    """``out`` and the per-fold/variant run folders of a fine-tuning (``out/fold*/*``)."""
    nested = [p for p in sorted(out.glob("fold*/*")) if p.is_dir()]
    return [out, *nested]


def previous_run(out: Path) -> list[Path]:
    """The checkpoints and metrics an earlier run left in ``out``."""
    from eegfast.train import checkpoint as ckpt

    if not out.is_dir():
        return []
    checkpoints, metrics = [], []
    for folder in _run_folders(out):
        checkpoints += [c.path for c in ckpt.list_checkpoints(folder / "checkpoints")[::-1]]
        if (folder / "metrics.csv").is_file():
            metrics.append(folder / "metrics.csv")
    return checkpoints + metrics  # newest checkpoint first


def _artefacts(out: Path) -> list[Path]:
    """What a run left in ``out`` (``RUN_ARTEFACTS`` in each run folder, the reports)."""
    found = []
    for folder in _run_folders(out):
        names = RUN_ARTEFACTS + (REPORT_ARTEFACTS if folder == out else ())
        found += [folder / name for name in names if (folder / name).exists()]
    return found


# An earlier run's artefacts while --overwrite replaces it: OUT/.replaced-<pid>/<same paths>.
SET_ASIDE = ".replaced-"


def set_previous_run_aside(out: Path) -> Path | None:
    """Move an earlier run's artefacts into ``out/.replaced-<pid>/`` (renames: cheap, and a
    crash half way loses nothing); None when there were none. :func:`discard_set_aside` deletes
    them once the new run has written, :func:`restore_set_aside` puts them back."""
    from eegfast.fileio import fsync_dir

    found = _artefacts(out)
    if not found:
        return None
    aside = out / f"{SET_ASIDE}{os.getpid()}"
    for path in found:
        target = aside / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    for folder in _run_folders(out)[1:]:  # the old run's now empty fold folders
        with contextlib.suppress(OSError):
            folder.rmdir()
    for fold in out.glob("fold*"):
        with contextlib.suppress(OSError):
            fold.rmdir()
    fsync_dir(out)
    return aside


def restore_set_aside(out: Path, aside: Path) -> None:
    """Put the artefacts :func:`set_previous_run_aside` moved back where they were."""
    from eegfast.fileio import fsync_dir

    for path in sorted(aside.glob("*")) + sorted(aside.glob("fold*/*/*")):
        name = path.name
        if name in RUN_ARTEFACTS or (path.parent == aside and name in REPORT_ARTEFACTS):
            target = out / path.relative_to(aside)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(out)


def discard_set_aside(aside: Path) -> None:
    shutil.rmtree(aside, ignore_errors=True)


def _recover_set_aside(out: Path) -> None:
    """Under the lock: a run killed while its predecessor was set aside. If it wrote nothing,
    the predecessor goes back (as if that run had not started); otherwise it is deleted."""
    for aside in sorted(out.glob(f"{SET_ASIDE}*")):
        if aside.is_dir() and not _artefacts(out):
            restore_set_aside(out, aside)
        else:
            discard_set_aside(aside)


def resolve_resume(resume: str | None, out: Path, expected: set[str] | None) -> str | None:
    """``--resume`` as fit() takes it: ``"auto"`` or a checkpoint folder; a run folder becomes
    its newest checkpoint. ``expected``: the checkpoint kinds (``arch.kind``) this command can
    continue (None: any)."""
    from eegfast.train import checkpoint as ckpt

    if resume is None or resume == "auto":
        if resume == "auto" and expected:
            latest = ckpt.latest_checkpoint(out / "checkpoints")
            if latest is not None:
                _check_kind(f"--resume auto ({latest.path})", latest.meta, expected)
        return resume
    path = Path(resume)
    accepted = "auto, a checkpoint folder (RUN/checkpoints/step-N) or a run folder"
    if not path.is_dir():
        raise CommandError(f"--resume {resume}: no such folder (expected {accepted})")
    if not (path / ckpt.STATE).is_file():
        latest = ckpt.latest_checkpoint(path / "checkpoints") or ckpt.latest_checkpoint(path)
        if latest is None or not (latest.path / ckpt.STATE).is_file():
            raise CommandError(
                f"--resume {resume}: not a checkpoint or run folder (expected {accepted})"
            )
        path = latest.path
    if expected:
        _check_kind(f"--resume {resume}", ckpt.checkpoint_meta(path), expected)
    return str(path)


def _check_kind(what: str, meta: dict[str, Any], expected: set[str]) -> None:
    kind = (meta.get("arch") or {}).get("kind") or meta.get("command")
    if kind not in expected:
        want = " or ".join(f"'{k}'" for k in sorted(expected))
        raise CommandError(f"{what}: a '{kind}' checkpoint, this command trains a {want}")


def _is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that writes the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_folder(
    args: argparse.Namespace, *, expected: set[str] | None = None
) -> Iterator[str | None]:
    """Claim ``args.out`` for this run and yield the ``--resume`` value for fit().

    Checks that --out is a folder (or new) and that --resume names something resumable, then,
    on rank 0 only (the one process that writes under torchrun), takes ``OUT/.lock`` for the
    run's life, so that a second run into the same folder is refused, and refuses a folder
    that holds an earlier run's checkpoints or metrics unless --resume or --overwrite is given.
    With --overwrite they are set aside (``OUT/.replaced-<pid>/``), deleted once this run ends
    or fails having written its own, and put back when it fails before writing anything."""
    out = Path(args.out)
    check_out(out)
    overwrite = bool(getattr(args, "overwrite", False))
    can_resume = hasattr(args, "resume")
    resume = getattr(args, "resume", None)
    if overwrite and resume:
        raise CommandError("--overwrite and --resume exclude each other (replace or continue)")
    resume = resolve_resume(resume, out, expected)
    if not resume and not overwrite:  # every rank, so that all of them refuse alike
        _refuse_previous_run(out, can_resume)
    if not _is_main_process():
        yield resume
        return
    created = not out.exists()
    try:
        with hold_lock(out):
            _recover_set_aside(out)
            aside = None
            if not resume:
                if overwrite:
                    # set aside, not deleted: a run that fails before writing anything (a
                    # typo in --data, a bad --init) leaves the earlier run as it was
                    aside = set_previous_run_aside(out)
                else:
                    # again, now that no other run can write there
                    _refuse_previous_run(out, can_resume)
            try:
                yield resume
            except BaseException:
                if aside is not None:
                    if _artefacts(out):  # the new run's (resumable) state replaces it
                        discard_set_aside(aside)
                    else:
                        restore_set_aside(out, aside)
                raise
            if aside is not None:
                discard_set_aside(aside)
    except BaseException:
        # a run that failed before writing anything (bad settings found after the claim)
        # leaves no folder of its own making behind, only what it found
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()
        raise


def _refuse_previous_run(out: Path, can_resume: bool) -> None:
    """Refuse an ``out`` holding an earlier run, naming the options the command has."""
    found = previous_run(out)
    if found:
        resume = "continue it with --resume auto, " if can_resume else ""
        raise CommandError(
            f"--out {out}: holds an earlier run ({found[0]}); {resume}replace it with "
            "--overwrite, or choose another --out"
        )


@contextlib.contextmanager
def hold_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``out/.lock`` while the block runs (released by the kernel if
    the process dies); refused with a one-line error while another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection, as before
        out.mkdir(parents=True, exist_ok=True)
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            by = f" (pid {holder})" if holder else ""
            raise CommandError(
                f"--out {out}: another eegfast run is writing to this folder{by}; wait for it "
                "to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def finished_message(result, what: str) -> str:
    """``<what> for N steps; checkpoint P``, or, for a resumed run that had nothing left to do,
    ``already complete at step N; checkpoint P``."""
    if result.checkpoint is None and result.resumed_from is not None:
        return f"already complete at step {result.step}; checkpoint {result.resumed_from}"
    steps = "1 step" if result.step == 1 else f"{result.step} steps"
    return f"{what} for {steps}; checkpoint {result.checkpoint}"
