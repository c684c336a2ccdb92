"""`prism data`: download the public routing data sets (`fetch`) and show what is where (`list`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download the public routing data sets, list them",
                       description="The public routing measurements prism-moe plans with (ESFT, MoE-Lens, OLMoE, "
                                   "Fiddler, speculative-moe), fetched from their GitHub repositories at pinned "
                                   "commits and checked against sha256 checksums.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", help="download data sets (all when none is named); resumes partial downloads")
    f.add_argument("names", nargs="*", metavar="NAME",
                   help="esft, moe-lens, olmoe-routing, fiddler, mixtral-decode (default: all)")
    f.add_argument("--dest", default=None,
                   help="data folder (default: $PRISM_DATA_DIR, else $XDG_CACHE_HOME/prism-moe/data, where the "
                        "readers look)")
    f.add_argument("--base-url", default=None,
                   help="where the repositories are served (default: $PRISM_DATA_BASE_URL or raw GitHub); "
                        "files are read from BASE/<owner>/<repo>/<commit>/<path>")
    f.set_defaults(func=run_fetch)
    ls = dsub.add_parser("list", help="the data sets, their origin and what the data folder holds")
    ls.add_argument("--dest", default=None, help="data folder to check (default: as for fetch)")
    ls.set_defaults(func=run_list)


def _dest(arg: str | None) -> Path:
    from prism_moe.stats.workload import user_data_dir

    return Path(arg).expanduser() if arg else user_data_dir()


def run_fetch(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from prism_moe.stats.fetch import (
        ChecksumError,
        base_url_from_env,
        download,
        is_present,
        load_catalog,
        select,
    )

    files = select(args.names, load_catalog())
    dest = _dest(args.dest)
    base = base_url_from_env(args.base_url)
    console = Console(stderr=True)
    todo = [f for f in files if not is_present(f, dest)]
    if not todo:
        console.print(f"all {len(files)} files already in {dest}, checksums verified")
        return 0
    total = sum(f.size for f in todo)
    console.print(f"fetching {len(todo)} of {len(files)} files ({total / 1e6:.1f} MB) from {base} into {dest}")
    try:
        with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0)) as client, Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=console) as prog:
            task = prog.add_task("data", total=total)
            for f in todo:
                prog.update(task, description=f.path)
                download(f, dest, client, base, advance=lambda n: prog.advance(task, n))
    except httpx.HTTPError as e:
        raise ValueError(f"download failed: {e}; check the network (or --base-url) and run the same command again "
                         f"to resume") from None
    except ChecksumError as e:
        raise ValueError(str(e)) from None
    console.print(f"done: {len(files)} files in {dest}, checksums verified")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prism_moe.stats.fetch import SETS, load_catalog

    dest = _dest(args.dest)
    table = Table("set", "origin", "licence", "files", "MB", f"in {dest}")
    for name, files in load_catalog().items():
        s = SETS[name]
        # a size check only: `fetch` verifies checksums
        here = sum((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size for f in files)
        table.add_row(name, f"github.com/{s.repo} @{s.commit[:7]}", s.licence, str(len(files)),
                      f"{sum(f.size for f in files) / 1e6:.1f}", f"{here}/{len(files)}")
    Console().print(table)
    return 0
