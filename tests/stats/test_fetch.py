"""`prism data fetch` against a local HTTP server (127.0.0.1, a base-URL override): no test touches the
internet. The server serves `<owner>/<repo>/<commit>/<path>` as raw GitHub does, with HTTP Range support
that a test can switch off, and records every request."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from prism_moe.cli import main
from prism_moe.stats import fetch
from prism_moe.stats.fetch import SETS, ChecksumError, DataFile, download, load_catalog, select
from prism_moe.stats.workload import load_workload


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.ranges = files, [], True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and outer.ranges:
                    start, status = int(rng.removeprefix("bytes=").split("-")[0]), 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served():
    servers = []

    def make(files):
        servers.append(_Server(files))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def _entry(set_name: str, path: str, data: bytes) -> tuple[DataFile, str]:
    f = DataFile(set_name, path, len(data), hashlib.sha256(data).hexdigest())
    s = SETS[set_name]
    return f, f"{s.repo}/{s.commit}/{s.upstream_path(path)}"


def test_download_checks_resumes_and_restarts(tmp_path, served):
    data = bytes(range(256)) * 1000
    f, url_path = _entry("fiddler", "fiddler-mixtral/original/expert_popularity_x.json", data)
    srv = served({url_path: data})
    dest = tmp_path / "data"
    seen = []
    with httpx.Client() as client:
        # resume: half of the file is there already, only the rest is asked for
        part = dest / (f.path + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(data[:100_000])
        out = download(f, dest, client, srv.url, advance=seen.append)
        assert out.read_bytes() == data and not part.exists()
        assert srv.requests[-1] == ("/" + url_path, "bytes=100000-")
        assert sum(seen) == len(data)
        # a server without Range support answers 200: the download starts over and is still right
        out.unlink()
        part.write_bytes(data[:5000])
        srv.ranges = False
        assert download(f, dest, client, srv.url).read_bytes() == data
        # wrong bytes: refused, nothing left behind to poison the next resume
        out.unlink()
        srv.files[url_path] = data[:-1] + b"\x00"
        with pytest.raises(ChecksumError, match="sha256"):
            download(f, dest, client, srv.url)
        assert not out.exists() and not part.exists()
        # more bytes than the catalog says: cut at the catalog's size (never fills the disk), then refused
        srv.files[url_path] = data + b"\x00" * 1_000_000
        with pytest.raises(ChecksumError, match="more than the catalog's"):
            download(f, dest, client, srv.url)
        assert not out.exists() and not part.exists()
        srv.files.pop(url_path)
        with pytest.raises(httpx.HTTPStatusError, match="404"):
            download(f, dest, client, srv.url)


def test_catalog_covers_every_set_with_checksums():
    cat = load_catalog()
    assert set(cat) == set(SETS)
    for name, files in cat.items():
        assert files, name
        for f in files:
            assert len(f.sha256) == 64 and f.size > 0
            assert f.url("https://raw.githubusercontent.com").startswith(
                f"https://raw.githubusercontent.com/{SETS[name].repo}/{SETS[name].commit}/")
    assert len(cat["esft"]) == 4 * 26 + 4 + 4
    with pytest.raises(ValueError, match="unknown data set"):
        select(["nope"], cat)


def test_prism_data_fetch_command_puts_files_where_the_readers_look(tmp_path, served, monkeypatch, capsys):
    # a small catalog of two ESFT layer files + prompts, served locally
    ids = "\t".join(["0", "1", "2", "3", "4", "5"] * 2) + "\t\t" + "\t".join(["0.1"] * 12) + "\n"
    files = {"esft/expert_scores/law/expert_weights_1.txt": ids.encode(),
             "esft/expert_scores/law/expert_weights_2.txt": ids.encode(),
             "esft/prompts/law.jsonl": json.dumps({"idx": 0, "prompt": "p0"}).encode() + b"\n"}
    entries = [_entry("esft", p, d) for p, d in files.items()]
    srv = served({u: files[f.path] for f, u in entries})
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"format": "prism-moe-data-catalog", "version": 1,
                               "files": {"esft": [[f.path, f.size, f.sha256] for f, _ in entries]}}))
    monkeypatch.setattr(fetch, "CATALOG", cat)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PRISM_DATA_DIR", raising=False)
    monkeypatch.setenv("PRISM_DATA_BASE_URL", srv.url)
    assert main(["data", "fetch", "esft"]) == 0
    dest = tmp_path / "xdg" / "prism-moe" / "data"
    assert "checksums verified" in capsys.readouterr().err
    w = load_workload("esft:law", dest)
    assert w.source == "esft:law" and w.trace.num_tokens == 2 and not w.notes
    n = len(srv.requests)
    assert main(["data", "fetch"]) == 0  # everything present: nothing downloaded again
    assert len(srv.requests) == n and "already in" in capsys.readouterr().err
    assert main(["data", "fetch", "nope"]) == 2
    assert "unknown data set" in capsys.readouterr().err
    (dest / "esft" / "prompts" / "law.jsonl").unlink()
    srv.files.clear()
    assert main(["data", "fetch"]) == 2  # the server lost the file: a clear error, not a traceback
    assert "run the same command again" in capsys.readouterr().err


def test_fetched_sets_equal_the_shared_data(real_data, tmp_path, served, monkeypatch):
    """The catalog's entries are the real files: serve shared/data under the upstream paths (ESFT's text
    ungzipped, as the repository serves it) and fetch two small sets through the command."""
    cat = load_catalog()
    served_files = {}
    for f in cat["fiddler"] + cat["mixtral-decode"] + cat["esft"][:26]:
        p = real_data / f.path
        data = p.read_bytes() if p.is_file() else gzip.decompress(Path(str(p) + ".gz").read_bytes())
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256), f.path
        served_files[_entry(f.set_name, f.path, data)[1]] = data
    srv = served(served_files)
    dest = tmp_path / "data"
    assert main(["data", "fetch", "fiddler", "mixtral-decode", "--dest", str(dest), "--base-url", srv.url]) == 0
    for name in ("fiddler:original:machine_learning", "mixtral-decode:gsm8k"):
        a, b = load_workload(name, dest), load_workload(name, real_data)
        assert (a.counts == b.counts).all(), name
