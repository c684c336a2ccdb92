"""Make `src/prism_moe/data/catalog.json`: every file of the public routing data sets with its size and
sha256, as `prism data fetch` downloads it (the files of shared/data are those files; only ESFT's text
files are gzipped there, so their catalog entries are the plain text the repository serves):

    .venv/bin/python scripts/make_data_catalog.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

from prism_moe.stats.fetch import CATALOG, CATALOG_FORMAT, SETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default=str(CATALOG))
    args = ap.parse_args()
    root = Path(args.data_dir)
    files: dict[str, list] = {}
    for name, s in SETS.items():
        rows = []
        for local, _ in s.layout:
            for p in sorted((root / local).rglob("*")):
                if not p.is_file():
                    continue
                data = p.read_bytes()
                rel = p.relative_to(root).as_posix()
                if rel.startswith("esft/") and p.suffix == ".gz":
                    data, rel = gzip.decompress(data), rel.removesuffix(".gz")
                rows.append([rel, len(data), hashlib.sha256(data).hexdigest()])
        if not rows:
            raise SystemExit(f"{root}: no files of set {name}")
        files[name] = rows
        print(f"{name}: {len(rows)} files, {sum(r[1] for r in rows) / 1e6:.1f} MB")
    # one file per line: readable diffs when a set moves to another commit
    sets = ",\n".join(f"  {json.dumps(n)}: [\n" + ",\n".join(f"    {json.dumps(r)}" for r in rows) + "\n  ]"
                       for n, rows in files.items())
    Path(args.out).write_text(f'{{"format": "{CATALOG_FORMAT}", "version": 1, "files": {{\n{sets}\n}}}}\n')


if __name__ == "__main__":
    main()
