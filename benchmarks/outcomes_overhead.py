"""What online outcomes cost the service: CPU per answer on the hot path and off it.

Runs the service's own code (``outcomes.live.LiveOutcomes``, which ``RecommendServicer``
holds, and the generated ``RecommendResponse``) in this process and measures thread CPU time
(``time.thread_time``: the machine is shared, wall time is noise), paired in every round:

* **hot path**: ``LiveOutcomes.served(...)`` (a recommendation id and a deque append) plus
  the two extra proto fields, against the same answer built without them;
* **served-log writer** (its own thread in the service): draining the queue into the live
  attribution index and committing it to SQLite, per answer;
* **TrackEvents**: ``LiveOutcomes.observe`` (attribution + counters) per event.

    python benchmarks/outcomes_overhead.py --answers 20000 --rounds 7 --out results/outcomes_overhead.json

Writes JSON (per-round values and medians) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _response(pb: Any, items: list[Any], rec: tuple[str, str] | None) -> Any:
    extra = {} if rec is None else {"recommendation_id": rec[0], "variant": rec[1]}
    return pb.RecommendResponse(
        request_id="req",
        items=[pb.ScoredItem(item_id=i.item_id, score=i.score) for i in items],
        segment="Loyal",
        model_version="model-1",
        index_version="index-1",
        **extra,
    )


def run(answers: int, rounds: int, k: int) -> dict[str, Any]:
    from intake.live_log import LiveEvent
    from outcomes.live import LiveOutcomes
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving.requests import ResultItem

    items = [
        ResultItem(f"B00{i:07d}", 1.0 - i / 100, 0.5, (), "Beauty", 9.99, "a product")
        for i in range(k)
    ]
    customers = [f"customer-{c}" for c in range(5000)]
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        live = LiveOutcomes(Path(tmp) / "events.db", flush_interval_s=3600, max_answers=50_000)
        try:
            for r in range(rounds):
                order = ("with", "without") if r % 2 == 0 else ("without", "with")
                cpu: dict[str, float] = {}
                for arm in order:
                    t = time.thread_time()
                    for n in range(answers):
                        if arm == "with":
                            rid = live.served(
                                "Recommend",
                                customers[n % 5000],
                                "default",
                                "model-1",
                                [i.item_id for i in items],
                            )
                            _response(pb, items, (rid, "default"))
                        else:
                            _response(pb, items, None)
                    cpu[arm] = (time.thread_time() - t) / answers
                t = time.thread_time()
                live.log.flush()  # what the writer thread does every flush interval
                writer = (time.thread_time() - t) / answers
                now = int(time.time())
                events = [
                    LiveEvent(customers[n % 5000], items[1].item_id, "click", now)
                    for n in range(answers // 4)
                ]
                t = time.thread_time()
                live.observe(events)
                observe = (time.thread_time() - t) / len(events)
                rows.append(
                    {
                        "with_us": cpu["with"] * 1e6,
                        "without_us": cpu["without"] * 1e6,
                        "added_us": (cpu["with"] - cpu["without"]) * 1e6,
                        "writer_us_per_answer": writer * 1e6,
                        "observe_us_per_event": observe * 1e6,
                    }
                )
                print(
                    f"round {r}: answer with {rows[-1]['with_us']:.2f} us, without "
                    f"{rows[-1]['without_us']:.2f} us (added {rows[-1]['added_us']:.2f}); "
                    f"writer {writer * 1e6:.2f} us/answer; observe {observe * 1e6:.2f} us/event"
                )
        finally:
            live.close()
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    med["ratio_with_without"] = statistics.median(r["with_us"] / r["without_us"] for r in rows)
    return {
        "answers_per_round": answers,
        "rounds": rounds,
        "k": k,
        "rounds_detail": rows,
        "median": med,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": list(__import__("os").getloadavg()),
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["median"]
    return (
        f"Outcomes overhead ({res['when']}, {res['rounds']} rounds x {res['answers_per_round']:,} "
        f"answers of k={res['k']}, thread CPU, medians; load average "
        f"{res['load_average'][0]:.1f})\n\n"
        "| what | CPU per unit |\n|---|---:|\n"
        f"| answer built WITHOUT id (proto only) | {m['without_us']:.2f} us |\n"
        f"| answer built WITH id + served-log queue | {m['with_us']:.2f} us |\n"
        f"| **added on the hot path** | **{m['added_us']:.2f} us** (x{m['ratio_with_without']:.2f} "
        "of the proto build) |\n"
        f"| served-log writer thread (drain + index + SQLite), per answer | "
        f"{m['writer_us_per_answer']:.2f} us |\n"
        f"| TrackEvents attribution (`observe`), per event | {m['observe_us_per_event']:.2f} us |\n"
    )


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--answers", type=int, default=20_000, help="answers per round and arm")
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds (order alternates)")
    ap.add_argument("--k", type=int, default=10, help="items per answer")
    ap.add_argument("--out", default="results/outcomes_overhead.json", help="JSON output")
    args = ap.parse_args(argv)
    res = run(args.answers, args.rounds, args.k)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
