"""Ingest benchmark: a generated event log of N rows (partitioned Parquet) -> validated,
id-mapped canonical events -> per-user training sequences, through polars streaming.

One record per size: ``rows, seconds, rows_per_second, peak_rss_mb`` (of the ingest
process alone, measured with ``wait4``), plus the CPU seconds, the generation time, the
sizes on disk and the load average. Each ingest runs in a fresh process so that its
peak RSS is its own. The generated log and the output are deleted after each size
unless ``--keep``.

    python benchmarks/ingest_scale.py --rows 10000000,100000000 --out results/ingest_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from intake.event_log import EventLogConfig, write_event_log


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_size(rows: int, work: Path, buckets: int, chunk_rows: int, keep: bool) -> dict[str, Any]:
    """Generate a log of ``rows`` events and ingest it in a child process; one record."""
    log_dir, out_dir = work / f"log_{rows}", work / f"out_{rows}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    if not (log_dir / "done").exists():
        shutil.rmtree(log_dir, ignore_errors=True)
        write_event_log(log_dir, EventLogConfig(rows=rows, chunk_rows=chunk_rows))
        (log_dir / "done").write_text("ok")
    gen_s = time.perf_counter() - t
    load_before = os.getloadavg()
    cmd = [sys.executable, "-m", "intake.ingest", str(log_dir), str(out_dir)]
    cmd += ["--buckets", str(buckets)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    out = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ingest of {rows} rows failed (exit {status})")
    res = json.loads(out.strip().splitlines()[-1])
    rec = {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mb": round(ru.ru_maxrss / 1024.0, 1),
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
        "customers": res["customers"],
        "products": res["products"],
        "buckets": buckets,
        "phase_seconds": {k: round(v, 2) for k, v in res["seconds"].items()},
        "generate_seconds": round(gen_s, 2),
        "log_mb": round(_du(log_dir) / 2**20, 1),
        "output_mb": round(_du(out_dir) / 2**20, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    if not keep:
        shutil.rmtree(log_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--rows", default="10000000,100000000", help="comma-separated log sizes")
    ap.add_argument("--out", required=True, help="JSON file with one record per size")
    ap.add_argument("--work", default="results/ingest_work", help="scratch directory")
    ap.add_argument("--buckets", type=int, default=32, help="user buckets of the sort step")
    ap.add_argument("--chunk-rows", type=int, default=2_000_000, help="rows per generated file")
    ap.add_argument("--keep", action="store_true", help="keep the generated log and output")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for n in [int(x) for x in a.rows.split(",") if x]:
        rec = run_size(n, work, a.buckets, a.chunk_rows, a.keep)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
