"""The chaos benchmark's short run (benchmarks/chaos.py --short): 3 servers and a coordinator process under
load through kill -9, a server restart, SIGSTOP/SIGCONT, a partition and a coordinator killed mid-migration
and restarted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

CHAOS = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"


def test_short_chaos_run_loses_nothing_on_survivors():
    run = subprocess.run([sys.executable, str(CHAOS), "--json", "--short"], capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["requests"] > 50
    assert out["failed_on_survivors"] == 0, out["survivor_failures"]
    assert out["wrong_tokens"] == 0
    assert out["failed_on_faulty_server"] > 0  # the killed server's own users did see it gone
    assert out["experts_without_copy_max_seconds"] == 0.0  # two copies of each expert, one fault at a time
    assert [f["fault"] for f in out["faults"]] == ["kill -9", "server restart", "SIGSTOP/SIGCONT", "partition",
                                                   "coordinator restart"]
    for f in out["faults"]:
        assert f.get("injected", True) and f["recovery_seconds"] is not None, f  # every fault recovered
    # the coordinator was killed in a live migration: its successor finished it or rolled it back
    assert out["faults"][-1]["outcome"] in ("finished", "rolled back", "partly moved")
    assert all(len(v) >= 2 for v in out["placement_versions"].values())  # the rejoin gave a new version
    assert out["survivor_request_max_seconds"] < 30  # nothing hung
