"""examples/grafana/prism-dashboard.json queries only metrics that a server's GET /metrics exports, with the
labels it groups by. The server here is the HTTP app on a real engine after a real completion; the expert
and peer counters are fed through ServerMetrics as the dispatcher and transport feed them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from prism_moe.runtime.engine import Engine
from prism_moe.runtime.http_api import create_app
from prism_moe.runtime.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "prism-dashboard.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes


def _exprs(doc: dict) -> list[str]:
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    out += [v["query"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    return out


def _exported(text: str) -> dict[str, set[str]]:
    """sample name -> label names, from the Prometheus text format."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        assert m, line
        labels = set(re.findall(r'([a-zA-Z_]+)="', m.group(3) or ""))
        out.setdefault(m.group(1), set()).update(labels)
    return out


def test_every_dashboard_metric_is_exported(engine: Engine) -> None:
    metrics = ServerMetrics("edge-a")
    with TestClient(create_app(engine, metrics, "tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "The edge", "max_tokens": 3})
        assert r.status_code == 200
        metrics.count_experts(0, 5, 3)  # what the dispatcher adds per MoE layer
        metrics.observe_remote_call("edge-b", 0.002, 1000, 1000)  # what the transport adds per call
        metrics.observe_remote_error("edge-b")
        metrics.set_placement_version(1)
        text = client.get("/metrics").text
    exported = _exported(text)
    doc = json.loads(DASHBOARD.read_text())
    assert doc["panels"] and all(p["targets"] for p in doc["panels"])
    for expr in _exprs(doc):
        names = set(re.findall(r"\bprism_[a-z_]+\b", expr))
        assert names, expr
        missing = names - set(exported)
        assert not missing, f"{missing} not in /metrics (query {expr})"
        labels = set().union(*(exported[n] for n in names)) | {"le"} | SCRAPE_LABELS
        for group in re.findall(r"by \(([^)]*)\)", expr):
            used = {g.strip() for g in group.split(",")}
            assert used <= labels, f"{used - labels} not a label of {names} (query {expr})"
        for label in re.findall(r'([a-z_]+)=~?"', expr):
            assert label in labels, f"{label} not a label of {names} (query {expr})"
    for kind in ("local", "remote"):
        assert f'kind="{kind}"' in text
