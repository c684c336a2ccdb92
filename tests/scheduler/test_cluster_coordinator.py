"""`prism cluster down` stops a coordinator that `cluster up --coordinator` recorded in the state file."""

from __future__ import annotations

import json
import subprocess
import sys

from prism_moe.runtime.launcher import STATE_FILE, stop_cluster


def test_stop_cluster_stops_the_recorded_coordinator(tmp_path):
    procs = {n: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
             for n in ("coordinator", "edge-a")}
    state = {"servers": {"edge-a": {"pid": procs["edge-a"].pid, "http": "http://127.0.0.1:1"}},
             "coordinator": {"pid": procs["coordinator"].pid, "http": "http://127.0.0.1:2"}}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert stop_cluster(tmp_path) == ["coordinator", "edge-a"]
    for p in procs.values():
        assert p.wait(timeout=10) is not None
    assert not (tmp_path / STATE_FILE).exists()
