"""The wheel: it builds without deprecation warnings, carries the embedded routing sample, installs into a
clean virtual environment and runs `prism place` there on the embedded data, with no repository checkout.

The new environment takes its dependencies (torch, transformers, ...) from this one through a `.pth` line,
so nothing is downloaded; prism-moe itself comes only from the wheel (checked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{cmd} failed:\n{out[-4000:]}"
    return out


def test_wheel_installs_into_a_clean_venv_and_places_on_the_embedded_sample(tmp_path):
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__} cannot build an SPDX licence: run make setup"
    # build: the environment's own setuptools, no build isolation (no download); verbose to see its warnings
    dist = tmp_path / "dist"
    out = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(dist),
                str(ROOT)], cwd=tmp_path)
    assert "deprecat" not in out.lower(), [line for line in out.splitlines() if "eprecat" in line]
    (wheel,) = dist.glob("prism_moe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for d in ("intent", "law", "summary", "translation"):
        assert f"prism_moe/data/esft-{d}.safetensors" in names
    assert {"prism_moe/data/esft-prompts.json", "prism_moe/data/README.md"} <= names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0 AND MIT" in meta

    # a clean venv that borrows only the dependencies
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)])

    # a folder with no checkout and no data folder in sight
    work = tmp_path / "work"
    work.mkdir()
    (work / "cluster.yaml").write_text(
        "model: deepseek-v2-lite\nservers:\n"
        "  - {name: a, memory_gib: 12, workload: 'embedded:esft:intent'}\n"
        "  - {name: b, memory_gib: 12, workload: 'esft:law'}\n"          # falls back to the sample
        "  - {name: c, memory_gib: 24, workload: 'embedded:esft:translation'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PRISM_DATA_DIR", "PYTHONPATH")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    where = _run([str(py), "-c", "import prism_moe; print(prism_moe.__file__)"], cwd=work, env=env).strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the repository's src/
    res = json.loads(_run([str(venv / "bin" / "prism"), "place", "--cluster", "cluster.yaml", "--algorithm",
                           "prism", "--json"], cwd=work, env=env))
    assert res["model"] == "deepseek-v2-lite"
    # real locality: the embedded ESFT sample keeps far more local than one copy spread evenly (0.67 remote)
    assert res["remote_fraction"] < 0.4, res["remote_fraction"]
    assert any("esft:law" in n and "embedded sample" in n for n in res["notes"]), res["notes"]
