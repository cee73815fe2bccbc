"""The bundled EEG sample: six real PhysioNet recordings, found or downloaded like MNE's fetchers.

``sample()`` returns the paths of

* ``S001R04.edf``, ``S001R08.edf``: EEG Motor Movement/Imagery Dataset (eegmmidb 1.0.0), subject
  S001, imagined left/right fist runs; 64 channels at 160 Hz, annotations T0/T1/T2;
* ``Subject00_1.edf``, ``Subject00_2.edf``, ``Subject01_1.edf``, ``Subject01_2.edf``: EEG During
  Mental Arithmetic Tasks (eegmat 1.0.0); 19 EEG + ``EEG A2-A1`` + ``ECG ECG`` at 500 Hz,
  ``_1`` = rest before the task, ``_2`` = during the task.

Where they are looked for, in order (a folder counts when it holds all six files with their
published sizes and SHA-256 checksums):

1. ``path`` if given (an error names it when the files are not there);
2. the ``EEGFAST_DATA`` environment variable, or the ``EEGFAST_DATA`` key of MNE's config file
   (``mne.set_config("EEGFAST_DATA", ...)``, read through ``mne.get_config``);
3. the cache folder ``$XDG_CACHE_HOME/eegfast/sample`` (default ``~/.cache/eegfast/sample``);
4. ``../shared/data`` beside the repository checkout (what tests, CI and ``make demo`` use);
5. otherwise the files are downloaded from PhysioNet into the cache folder with ``pooch``, each
   checked against its published SHA-256 before it is moved into place (a mismatch raises
   ``SampleDataError`` and leaves no file behind). ``mirror=URL`` (or ``EEGFAST_SAMPLE_MIRROR``)
   downloads from a flat folder holding the six files instead.

Licence: both datasets are ODC-By 1.0; ``ATTRIBUTION`` must accompany any public use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ATTRIBUTION",
    "SAMPLE_FILES",
    "SampleDataError",
    "SampleFile",
    "cache_dir",
    "sample",
    "verify_sample",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

ATTRIBUTION = (
    "Contains data from the EEG Motor Movement/Imagery Dataset (version 1.0.0) by Gerwin Schalk, "
    "Dennis J. McFarland, Thilo Hinterberger, Niels Birbaumer and Jonathan R. Wolpaw, published "
    "on PhysioNet (https://physionet.org/content/eegmmidb/1.0.0/), and from EEG During Mental "
    "Arithmetic Tasks (version 1.0.0) by Igor Zyma, Sergii Tukaev, Ivan Seleznov, Ken Kiyono, "
    "Anton Popov, Mariia Chernykh and Oleksii Shpenkov, published on PhysioNet "
    "(https://physionet.org/content/eegmat/1.0.0/); both licensed under the Open Data Commons "
    "Attribution License v1.0 (ODC-By 1.0, https://opendatacommons.org/licenses/by/1-0/)."
)


@dataclass(frozen=True)
class SampleFile:
    name: str
    dataset: str  # "eegmmidb" or "eegmat"
    physionet_url: str
    size: int
    sha256: str


_MMIDB = "https://physionet.org/files/eegmmidb/1.0.0/S001/"
_EEGMAT = "https://physionet.org/files/eegmat/1.0.0/"

SAMPLE_FILES: tuple[SampleFile, ...] = (
    SampleFile(
        "S001R04.edf",
        "eegmmidb",
        _MMIDB + "S001R04.edf",
        2_596_896,
        "3d161f88e1c00632585287d2ce584c2bc0f08862438eb255ea8723e00fac693d",
    ),
    SampleFile(
        "S001R08.edf",
        "eegmmidb",
        _MMIDB + "S001R08.edf",
        2_596_896,
        "358fb5189220725141968ae285fbe9e3f36210b834ffba71d940af308e3aca68",
    ),
    SampleFile(
        "Subject00_1.edf",
        "eegmat",
        _EEGMAT + "Subject00_1.edf",
        3_848_636,
        "8b23c443f2f5f733f8ccc31a54377898009c28c7563d1107692a8735212d2f15",
    ),
    SampleFile(
        "Subject00_2.edf",
        "eegmat",
        _EEGMAT + "Subject00_2.edf",
        1_314_956,
        "635bbf035777008ff6c23d9c7bfc497d584fc71c56217022946d1fd056527e43",
    ),
    SampleFile(
        "Subject01_1.edf",
        "eegmat",
        _EEGMAT + "Subject01_1.edf",
        3_848_636,
        "9ece09029ed7d6911d96a776eb86905dd00a53c065c8eb9e0fd3c7aefd0f7ac4",
    ),
    SampleFile(
        "Subject01_2.edf",
        "eegmat",
        _EEGMAT + "Subject01_2.edf",
        1_314_956,
        "cbc4a053c2c8ce0e77ff62b4608a2cc2fe584886a6cd2fa0b343cfce3212376f",
    ),
)


class SampleDataError(RuntimeError):
    """The sample files could not be found or downloaded intact."""


# The ways round a failed look-up or download, for every message that ends in one.
_WHAT_TO_DO = (
    "Set EEGFAST_DATA to a folder holding the six files (see eegfast.datasets.SAMPLE_FILES), "
    "XDG_CACHE_HOME to a writable folder to download them into, or EEGFAST_SAMPLE_MIRROR "
    "(mirror=URL) to a URL serving them."
)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/eegfast/sample`` (default ``~/.cache/eegfast/sample``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eegfast" / "sample"


def _has_sample(folder: Path) -> bool:
    # The checksums too, not only the sizes: a cached file damaged in place keeps its size, and
    # would otherwise be read as EEG. Hashing the six files (15.5 MB) takes a few tens of ms.
    return all(_has_sample_file(folder, f) for f in SAMPLE_FILES)


def _configured_dir() -> Path | None:
    env = os.environ.get("EEGFAST_DATA")
    if env:
        return Path(env)
    try:
        import mne
    except ImportError:  # pragma: no cover - mne is a dependency
        return None
    value = mne.get_config("EEGFAST_DATA", use_env=False)
    return Path(value) if value else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sample(folder: str | os.PathLike) -> list[str]:
    """Problems with the sample files in ``folder`` (missing, wrong size, wrong SHA-256)."""
    folder = Path(folder)
    problems = []
    for f in SAMPLE_FILES:
        path = folder / f.name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != f.size:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {f.size}")
        elif _sha256(path) != f.sha256:
            problems.append(f"{path}: SHA-256 differs from the published checksum")
    return problems


# The URL schemes pooch downloads from (a mirror is a flat folder of the six files).
_MIRROR_SCHEMES = ("http", "https", "ftp", "sftp")


def _check_mirror(name: str, mirror: str) -> None:
    """Refuse a mirror pooch cannot download from before any download starts: pooch raises
    ValueError for it, which read as a failed SHA-256 check of the first file."""
    scheme, sep, _ = mirror.partition("://")
    if mirror.lower().startswith("doi:") or (sep and scheme.lower() in _MIRROR_SCHEMES):
        return
    raise SampleDataError(
        f"{name}: {mirror!r} is not a URL to download from (it must start with "
        f"{', '.join(s + '://' for s in _MIRROR_SCHEMES)} or doi:); a local folder holding the "
        "six files is passed as path= or EEGFAST_DATA instead"
    )


def _download(target: Path, mirror: str | None, progress: bool, missing: list[SampleFile]) -> None:
    import pooch

    from eegfast.fileio import write_text_atomic

    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleDataError(
            f"cannot create the sample cache folder {target} ({err.strerror or err}); {_WHAT_TO_DO}"
        ) from err
    for f in missing:
        url = mirror.rstrip("/") + "/" + f.name if mirror else f.physionet_url
        try:
            # pooch downloads to a temporary file beside the target and moves it into place only
            # after the hash matched, so a bad download never leaves a file called f.name.
            pooch.retrieve(
                url,
                known_hash=f"sha256:{f.sha256}",
                fname=f.name,
                path=target,
                progressbar=progress,
            )
        except ValueError as err:
            raise SampleDataError(
                f"download of {f.name} from {url} failed its SHA-256 check ({err}); "
                f"no {f.name} was kept in {target}"
            ) from err
        except Exception as err:
            raise SampleDataError(
                f"could not download {f.name} from {url}: {err}. {_WHAT_TO_DO}"
            ) from err
    notice = target / "ATTRIBUTION.txt"
    # Written atomically, and again where an interrupted older write left it incomplete: the
    # notice must travel with the files in full.
    kept = notice.read_text(encoding="utf-8", errors="replace") if notice.is_file() else None
    if kept != ATTRIBUTION + "\n":
        try:
            write_text_atomic(notice, ATTRIBUTION + "\n")
        except OSError as err:
            raise SampleDataError(
                f"cannot write {notice} ({err.strerror or err}); {_WHAT_TO_DO}"
            ) from err


def sample(
    path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirror: str | None = None,
    cache: str | os.PathLike | None = None,
    locations: Sequence[str | os.PathLike] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Paths of the six sample recordings (order of ``SAMPLE_FILES``), downloading if needed.

    Parameters
    ----------
    path : folder to use instead of searching (must hold all six files).
    download : when False, raise ``SampleDataError`` instead of downloading.
    mirror : URL of a flat folder with the six files (default: PhysioNet, or the
        ``EEGFAST_SAMPLE_MIRROR`` environment variable).
    cache : download folder (default ``cache_dir()``); also searched before ``../shared/data``.
    locations : folders searched before downloading, in order (default: ``EEGFAST_DATA`` or
        MNE's config key of that name, the cache folder, ``../shared/data``); ``[]`` forces a
        download into ``cache`` (files already there with the right checksum are kept).
    progress : show pooch's download progress bar.

    The data are ODC-By 1.0: keep ``eegfast.datasets.ATTRIBUTION`` with any public use.
    """
    if path is not None:
        folder = Path(path)
        if not _has_sample(folder):
            problems = "; ".join(verify_sample(folder)[:3])
            raise SampleDataError(f"path: {folder} does not hold the sample files ({problems})")
        return [folder / f.name for f in SAMPLE_FILES]
    cache_folder = Path(cache) if cache is not None else cache_dir()
    configured = _configured_dir()
    if locations is None:
        search = [p for p in (configured, cache_folder, SHARED_DATA) if p is not None]
    else:
        search = [Path(p) for p in locations]
    for folder in search:
        if _has_sample(folder):
            return [folder / f.name for f in SAMPLE_FILES]
    if configured is not None and configured in search and configured.exists():
        # A user-chosen folder that is incomplete is probably a mistake worth naming.
        problems = "; ".join(verify_sample(configured)[:3])
        hint = f" (EEGFAST_DATA={configured}: {problems})"
    else:
        hint = ""
    if not download:
        raise SampleDataError(
            f"the EEG sample files were not found in {', '.join(map(str, search)) or '(nowhere)'}"
            f"{hint}, and download=False"
        )
    name = "mirror" if mirror else "EEGFAST_SAMPLE_MIRROR"
    mirror = mirror or os.environ.get("EEGFAST_SAMPLE_MIRROR") or None
    if mirror is not None:
        _check_mirror(name, mirror)
    missing = [f for f in SAMPLE_FILES if not _has_sample_file(cache_folder, f)]
    _download(cache_folder, mirror, progress, missing)
    return [cache_folder / f.name for f in SAMPLE_FILES]


def _has_sample_file(folder: Path, f: SampleFile) -> bool:
    path = folder / f.name
    return path.is_file() and path.stat().st_size == f.size and _sha256(path) == f.sha256
