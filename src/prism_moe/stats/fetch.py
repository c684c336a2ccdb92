"""Download the public routing data sets from their origin repositories at pinned commits.

`SETS` says where each set comes from; the catalog shipped in the package (`prism_moe/data/catalog.json`,
made by `scripts/make_data_catalog.py`) lists every file with its size and sha256. A file is fetched from
`<base>/<repo>/<commit>/<upstream path>` (raw GitHub by default), into `<dest>/<path>.part`, resumed with
an HTTP Range request when a partial file is there, checked against its sha256 and only then renamed into
place, so the readers never see a torn or wrong file. Files already present with the right checksum are
skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
BASE_URL_ENV = "PRISM_DATA_BASE_URL"
CATALOG = Path(__file__).resolve().parents[1] / "data" / "catalog.json"
CATALOG_FORMAT = "prism-moe-data-catalog"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class DataSet:
    """One public data set: its repository at a pinned commit, and how its files are laid out there.
    `layout` maps a folder of the local data folder to the folder of the repository that holds it."""

    repo: str
    commit: str
    licence: str
    layout: tuple[tuple[str, str], ...]

    def upstream_path(self, path: str) -> str:
        for local, remote in self.layout:
            if path.startswith(local):
                return remote + path[len(local):]
        raise ValueError(f"{path} is not in the layout of {self.repo}")


# names = the workload families that read them (prism_moe.stats.workload)
SETS: dict[str, DataSet] = {
    "esft": DataSet("deepseek-ai/ESFT", "579a7711e4b332b4c57b47e378a0cf240d85caa6", "MIT", (
        ("esft/expert_scores/", "results/expert_scores/"), ("esft/prompts/", "datasets/eval/"),
        ("esft/expert_configs/", "results/expert_configs/"))),
    "moe-lens": DataSet("MarmikChaudhari/moe-interp", "f0522bbed566504f5ffedcd9a74d765e2a6a8f87",
                        "no licence file (measurements)", (("moe-lens/", "data-ext/pt/"),)),
    "olmoe-routing": DataSet("allenai/OLMoE", "357454f4f647385839c0ff6b99a688dc7cd9c13f", "Apache-2.0",
                             (("olmoe-routing/", "scripts/routing_output/"),)),
    "fiddler": DataSet("efeslab/fiddler", "7f82a2d2c1294d84f0c1b6107e38c50547106c2b", "Apache-2.0", (
        ("fiddler-mixtral/original/", "benchmarks/results/popularity/mixtral_8x7b_original/"),
        ("fiddler-mixtral/instruct/", "benchmarks/results/popularity/mixtral_8x7b_instruct/"))),
    "mixtral-decode": DataSet("Mario928/speculative-moe", "216e26eb86ee09fa46bb0e8c000be7e9758e10b6",
                              "no licence file (measurements)", (("mixtral-decode/", "routing_data_collected/"),)),
}


@dataclass(frozen=True)
class DataFile:
    """One file of a set: `path` in the local data folder, its size in bytes and sha256 (hex)."""

    set_name: str
    path: str
    size: int
    sha256: str

    def url(self, base_url: str) -> str:
        s = SETS[self.set_name]
        return f"{base_url.rstrip('/')}/{s.repo}/{s.commit}/{s.upstream_path(self.path)}"


class ChecksumError(ValueError):
    """A downloaded file is not the one the catalog names."""


def load_catalog(path: Path | None = None) -> dict[str, list[DataFile]]:
    """The files of every set, by set name (from the package's catalog when `path` is None)."""
    path = path or CATALOG
    doc = json.loads(path.read_text())
    if doc.get("format") != CATALOG_FORMAT or doc.get("version") != 1:
        raise ValueError(f"{path}: not a version-1 {CATALOG_FORMAT} file")
    out: dict[str, list[DataFile]] = {}
    for name, rows in doc["files"].items():
        if name not in SETS:
            raise ValueError(f"{path}: unknown data set {name!r}")
        out[name] = [DataFile(name, p, int(n), h) for p, n, h in rows]
    return out


def select(names: Iterable[str], catalog: dict[str, list[DataFile]]) -> list[DataFile]:
    """The files of the named sets (all sets when none is named), in catalog order."""
    names = list(names) or list(catalog)
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(catalog)}")
    return [f for n in dict.fromkeys(names) for f in catalog[n]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_present(f: DataFile, dest: Path) -> bool:
    p = dest / f.path
    return p.is_file() and p.stat().st_size == f.size and sha256_of(p) == f.sha256


def download(f: DataFile, dest: Path, client: httpx.Client, base_url: str,
             advance: Callable[[int], None] = lambda n: None) -> Path:
    """Fetch one file into `dest/f.path` (resuming `<path>.part`), check its sha256, move it into place.
    `advance(n)` is called with each chunk's size (and once with the resumed bytes)."""
    target = dest / f.path
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # not a prefix of this file
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if 0 < have < f.size else {}
    url = f.url(base_url)
    if have < f.size:
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code == 206 and headers:
                mode = "ab"  # the server resumes where the part file ends
                advance(have)
            elif r.status_code == 200:
                mode = "wb"  # no range support: start over
            else:
                raise httpx.HTTPStatusError(f"GET {url}: HTTP {r.status_code}", request=r.request, response=r)
            size = have if mode == "ab" else 0
            with open(part, mode) as out:
                for chunk in r.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > f.size:  # not this file: stop before a wrong server fills the disk
                        break
                    out.write(chunk)
                    advance(len(chunk))
            if size > f.size:
                part.unlink()
                raise ChecksumError(f"{url}: served more than the catalog's {f.size} bytes ({f.path}); the partial "
                                    f"file was removed; if it happens again the upstream file changed")
    else:
        advance(have)
    got = sha256_of(part)
    if got != f.sha256:
        part.unlink()  # a wrong prefix would poison every resume
        raise ChecksumError(f"{url}: sha256 {got} does not match the catalog's {f.sha256} ({f.path}); the partial "
                            f"file was removed, run the fetch again; if it fails again the upstream file changed")
    os.replace(part, target)
    return target


def base_url_from_env(base_url: str | None = None) -> str:
    return base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
