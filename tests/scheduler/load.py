"""Greedy completion traffic against real servers, shared by the multi-process scheduler tests."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import httpx


class Outcome(NamedTuple):
    server: str
    start: float
    end: float
    ok: bool
    detail: str


class Load:
    """One client thread per server sending greedy completions (prompts in turn, each checked against its
    reference token ids in `refs`) until stopped; records every outcome."""

    def __init__(self, urls: dict[str, str], refs: dict, model: str, prompts: list[str], max_tokens: int) -> None:
        self.urls, self.refs, self.model, self.prompts, self.max_tokens = urls, refs, model, prompts, max_tokens
        self.results: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in urls]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, name: str) -> None:
        i = 0
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                prompt_ids, want = self.refs[self.prompts[i % len(self.prompts)]]
                i += 1
                t0 = time.monotonic()
                try:
                    r = http.post(f"{self.urls[name]}/v1/completions", json={
                        "model": self.model, "prompt": prompt_ids, "max_tokens": self.max_tokens, "temperature": 0,
                        "return_token_ids": True})
                    got = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text
                    ok, detail = got == want, f"{got} vs {want}"
                except Exception as e:  # counted as a failed request
                    ok, detail = False, repr(e)
                self.results.append(Outcome(name, t0, time.monotonic(), ok, detail))

    def done(self, name: str, after: float = 0.0) -> int:
        """Requests to `name` started at or after `after` that have ended (well or not)."""
        return sum(1 for r in self.results if r.server == name and r.start >= after)

    def wait(self, names: list[str], after: float, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.done(n, after) == 0 for n in names):
            assert time.monotonic() < deadline, "requests do not complete"
            time.sleep(0.05)

    def check(self, names: list[str], longest: float) -> None:
        """Every request completed with the reference tokens within `longest` seconds; each server got some."""
        bad = [r for r in self.results if not r.ok]
        assert not bad, bad[:3]
        for n in names:
            assert any(r.server == n for r in self.results), f"no request on {n} completed"
        slowest = max(r.end - r.start for r in self.results)
        assert slowest < longest, f"a request took {slowest:.1f} s"
