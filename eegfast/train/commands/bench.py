"""``eegfast bench [--suite NAME ...] [--out bench-results]``: run the CPU benchmark suites.

Runs ``benchmarks/bench_<suite>.py`` of a source checkout with pytest-benchmark (every suite by
default) and writes ``bench.json`` (pytest-benchmark's raw results) and ``bench.md`` (median
times per case, grouped as in the suites, with the ratio to the fastest case of each group).
GPU benchmarks: ``python -m benchmarks.gpu`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from eegfast.fileio import write_text_atomic
from eegfast.train.commands.common import CommandError, run_command

REPO_ROOT = Path(__file__).resolve().parents[3]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--suite",
        action="append",
        default=None,
        help="suite name (bench_<name>.py); repeatable; default: all",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output folder (default: bench-results)",
    )
    parser.add_argument(
        "--benchmarks",
        type=Path,
        default=REPO_ROOT / "benchmarks",
        help="benchmarks folder of the source checkout (default: benchmarks, beside the "
        "eegfast package)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (rough numbers)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")


def suites(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise CommandError(
            f"benchmarks folder not found: {folder} (eegfast bench runs from a source checkout; "
            "pass --benchmarks DIR)"
        )
    return {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}


def markdown(results: dict) -> str:
    lines = [
        "# eegfast CPU benchmarks",
        "",
        f"- machine: {results.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}, "
        f"Python {results.get('machine_info', {}).get('python_version', '?')}",
        f"- commit: {results.get('commit_info', {}).get('id', '?')}"
        # numbers from an edited tree are not that commit's
        + (" with uncommitted changes" if results.get("commit_info", {}).get("dirty") else ""),
        "",
        "| group | case | median (ms) | ratio to fastest in group | rounds |",
        "|---|---|---|---|---|",
    ]
    by_group: dict[str, list[dict]] = {}
    for bench in results.get("benchmarks", []):
        by_group.setdefault(bench.get("group") or bench["fullname"].split("::")[0], []).append(
            bench
        )
    for group, benches in sorted(by_group.items()):
        fastest = min(b["stats"]["median"] for b in benches)
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = b["stats"]["median"]
            lines.append(
                f"| {group} | {b['name']} | {median * 1e3:.3f} | "
                f"{median / fastest:.2f}x | {b['stats']['rounds']} |"
            )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    return run_command("bench", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    found = suites(args.benchmarks)
    if args.list:
        print("\n".join(f"{name:12s} {path}" for name, path in found.items()))
        return 0
    chosen = args.suite or list(found)
    unknown = sorted(set(chosen) - set(found))
    if unknown:
        raise CommandError(f"--suite: unknown {unknown}; suites: {', '.join(found)}")
    # pytest runs in the checkout's root, not here: relative paths would be read there (the
    # suites) and written there (the results), so they are made absolute first
    out = args.out.resolve()
    try:  # (here, not in the CLI's --out check: --list writes nothing)
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # (exist_ok: a file of that name)
        raise CommandError(f"--out {args.out}: exists and is not a folder") from None
    except OSError as err:  # no permission, a file on the way
        raise CommandError(f"--out {args.out}: cannot make the folder ({err.strerror})") from None
    raw = out / "bench.json"
    # a run that writes nothing must not be reported with an earlier run's results
    raw.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        *[str(found[n].resolve()) for n in chosen],
        "--benchmark-only",
        f"--benchmark-json={raw}",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if args.quick:
        command += [
            "--benchmark-min-rounds=1",
            "--benchmark-max-time=0.05",
            "--benchmark-warmup=off",
        ]
    print("running:", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=args.benchmarks.resolve().parent).returncode
    try:
        # (a suite that fails to import may leave an empty bench.json, depending on the
        # pytest-benchmark version)
        results = json.loads(raw.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict):
        raise CommandError(f"the benchmarks wrote no results (pytest exit status {status})")
    report = out / "bench.md"
    write_text_atomic(report, markdown(results))
    print(f"results: {raw}\nreport:  {report}")
    return 0 if status == 0 else 1
