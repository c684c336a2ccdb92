"""The README's commands work as written.

The five-minute tour's shell and Python blocks are taken from README.md itself and run in a scratch folder
holding a copy of `examples/` (the set-up line is skipped: the tests already run inside the installed
environment). The demo runs in a smoke mode (one request per server, a placement and a plan).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _blocks(section: str, lang: str) -> list[str]:
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no section {section!r}"
    return re.findall(rf"```{lang}\n(.*?)```", m.group(1), re.S)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: setup\n\t.*pytest", makefile, re.M)
    assert re.search(r"^demo: setup\n\t.*prism demo", makefile, re.M)


def test_five_minute_tour_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bash = _blocks("A five-minute tour", "bash")
    python = _blocks("A five-minute tour", "python")
    assert len(bash) == 3 and len(python) == 1
    setup, query, inspect = bash
    setup = "\n".join(line for line in setup.splitlines() if not line.startswith("make setup"))
    (tmp_path / "client.py").write_text("import os\nURL = os.environ['URL']\n" + python[0])
    script = (f"set -euo pipefail\ntrap 'prism cluster down --cluster examples/local-tiny.yaml >/dev/null 2>&1 || true' EXIT\n"
              f"{setup}\n{query}\nexport URL\n{sys.executable} client.py\n{inspect}\n")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert '"token_ids"' in out  # curl's completion with return_token_ids
    assert "Completion(" in out  # the openai client's answer
    assert 'prism_expert_invocations_total{kind="remote"' in out
    assert "stopped edge-a" in out


def test_demo_smoke(tmp_path):
    r = subprocess.run(
        [str(BIN / "prism"), "demo", "--requests", "1", "--max-tokens", "2", "--algorithms", "prism", "hybrid",
         "--out", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "models")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    report = tmp_path / "report"
    for name in ("report.md", "results.csv", "results.json", "latency.png", "invocations.png", "placements.png"):
        assert (report / name).is_file(), name
    csv = (report / "results.csv").read_text().splitlines()
    assert csv[0].startswith("algorithm,") and {line.split(",")[0] for line in csv[1:]} == {"prism", "hybrid"}
