"""Shared fixtures of the stats tests: where the real routing data is, and small hand-made files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

# CI keeps the data beside the repository (../shared/data); PRISM_DATA_DIR overrides.
_REPO = Path(__file__).resolve().parents[2]


def _real_data_dir() -> Path | None:
    env = os.environ.get("PRISM_DATA_DIR")
    for p in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = _real_data_dir()
    if d is None:
        pytest.skip("real routing data not found (set PRISM_DATA_DIR or put it at ../shared/data)")
    return d


def _write_esft_file(path: Path, lines: list[tuple[list[int], list[float]]], gz: bool = True) -> Path:
    """One ESFT layer file: per line, ids tab-separated, two tabs, weights tab-separated."""
    text = "".join("\t".join(map(str, ids)) + "\t\t" + "\t".join(map(str, w)) + "\n" for ids, w in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def write_esft():
    """The ESFT layer-file writer: write_esft(path, [(ids, weights), ...], gz=True)."""
    return _write_esft_file
