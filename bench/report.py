"""Printing the result as tables (Markdown, so docs/benchmarks.md can take them as they are) and saving JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["save", "tables"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    """The whole result as Markdown tables."""
    out: list[str] = []
    m = result.get("machine", {})
    out.append(f"Run {result.get('run')} ({result.get('profile', {}).get('name')}), {result.get('started')}, "
               f"{result.get('duration_s')} s; {m.get('nproc')} cores ({m.get('cpu_model')}), "
               f"{m.get('memory_gib')} GiB; Kafka {m.get('kafka')}, librdkafka {m.get('librdkafka')}, "
               f"Python {m.get('python')}, Celery {m.get('celery')}, Redis {m.get('redis')}; "
               f"load average start {result.get('load_average', {}).get('start')}, "
               f"during {result.get('load_average', {}).get('during')}; worker pool "
               f"{result.get('profile', {}).get('pool')} x{result.get('profile', {}).get('concurrency')}")

    if "targets" in result:
        out.append("\n### Targets\n")
        out.append(_table(["target", "measured", "met"],
                          [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in result["targets"]]))

    lat = result.get("latency")
    if lat:
        floor = next((r for r in lat["rows"] if r["key"] == "floor.ephemeral"), {})
        fp50 = floor.get("p50_ms")
        out.append("\n### 1-2. Round-trip latency (ms)\n")
        rows = []
        for r in lat["rows"]:
            ratio = r["p50_ms"] / fp50 if fp50 and r.get("p50_ms") else None
            rows.append([r["shape"], r["group"], r["path"], r.get("n", 0), r.get("p50_ms"), r.get("p99_ms"),
                         f"{ratio:.2f}x" if ratio else "-",
                         " / ".join(_fmt(x) for x in r.get("round_p50_ms", [])) or r.get("error", "-")])
        out.append(_table(["shape", "who", "path", "n", "p50", "p99", "p50 / floor", "p50 per round"], rows))
        c = lat.get("floor_create_topic", {})
        if c.get("n"):
            out.append(f"\nCreating one return topic (in the floor): p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms.")

    tp = result.get("throughput")
    if tp:
        out.append(f"\n### 3. Throughput ({tp.get('request')})\n")
        rows = []
        for r in tp["rows"]:
            if r.get("skipped"):
                rows.append([r["design"], r["in_flight"], "-", "-", "-", "-", r["skipped"]])
                continue
            churn = r.get("churn", {}).get("by_owner", {})
            made = [v for o, v in churn.items() if o.startswith("fusion") or o == "clj"]
            created = round(sum(v.get("created_per_s", 0) for v in made), 1)
            peak = sum(v.get("peak_alive", 0) for v in made)
            note = r.get("note", "")
            if not r.get("drained", True):
                note = f"{note} {r.get('lost')} lost in drain".strip()
            rows.append([r["design"], r["in_flight"], r.get("rps"), r.get("p50_ms"), r.get("p99_ms"),
                         f"{created} / {peak}", _fmt(r.get("topics_created_per_request")),
                         (f"{r.get('failed')} failed " if r.get("failed") else "") + note])
        out.append(_table(["design", "in flight", "req/s", "p50 ms", "p99 ms",
                           "return topics created/s / peak alive", "topics created per request", "notes"], rows))

    w = result.get("waiting")
    if w:
        out.append("\n### 4. Cost of waiting (one process holding N pending waits)\n")
        rows = []
        for design in ("fusion-celery", "consumer-per-wait"):
            for r in w.get(design, []):
                if r.get("survived") is False:
                    died = "" if r.get("alive", True) else "; process died"
                    rows.append([design, r["pending"], _fmt(r.get("total_mib")), "-", "-", "-", "-", "-",
                                 f"not reached in time ({r.get('parked')} parked{died})"])
                    continue
                per = r.get("per_wait_kib", "-")
                if r.get("per_wait_main_kib") is not None:
                    per = f"{r['per_wait_main_kib']} main / {per} total"
                rows.append([design, r["pending"], r.get("main_mib"), r.get("total_mib"), per,
                             r.get("threads"), r.get("cpu_pct"), r.get("broker_cpu_pct"),
                             f"parked in {r['park_s']} s" if r.get("park_s") is not None else "baseline"])
        out.append(_table(["design", "pending", "main RSS MiB", "total RSS MiB", "KiB per wait", "threads",
                           "CPU %", "broker CPU %", "notes"], rows))
        for key in ("fusion_release", "clj_release"):
            if key in w:
                out.append(f"\n{key.replace('_', ' ')}: {w[key]}")
        for note in w.get("notes", []):
            out.append(f"\nnote: {note}")

    churn_rows = []
    for key in ("churn_fusion", "churn_clj"):
        c = (w or {}).get(key)
        if c:
            for owner, v in c["by_owner"].items():
                churn_rows.append([c["label"], owner, v["created"], v["deleted"], v["created_per_s"],
                                   v["deleted_per_s"], v["peak_alive"]])
    for r in (tp or {}).get("rows", []):
        c = r.get("churn")
        if c:
            for owner, v in c["by_owner"].items():
                churn_rows.append([c["label"], owner, v["created"], v["deleted"], v["created_per_s"],
                                   v["deleted_per_s"], v["peak_alive"]])
    if churn_rows:
        out.append("\n### 5. Return-topic churn (sampled every "
                   f"{result.get('churn', {}).get('interval_s')} s; peak alive in the whole run: "
                   f"{result.get('churn', {}).get('peak_alive')})\n")
        out.append(_table(["window", "made by", "created", "deleted", "created/s", "deleted/s", "peak alive"],
                          churn_rows))

    brokers = result.get("brokers")
    if brokers:
        from .brokers import table_rows
        out.append(f"\n### 6. Celery broker: onedep, latency one call at a time and throughput at "
                   f"{brokers.get('in_flight')} in flight ({brokers.get('request')})\n")
        out.append(_table(["broker", "n", "p50 ms", "p90 ms", "p99 ms", "req/s", "p50 ms loaded", "p99 ms loaded",
                           "failed"], table_rows(brokers)))

    left = result.get("leftovers", [])
    if left:
        out.append("\n### Return topics left after each section\n")
        out.append(_table(["section", "left", "seconds to zero"],
                          [[x["section"], x["left"], x.get("seconds_to_zero", "-")] for x in left]))
        held = [x.get("held_by_pool") for x in left if x.get("held_by_pool") is not None]
        if held:
            out.append(f"\nReady topics the pooled worker's pool held at those checks (not leftovers while it runs; "
                       f"the end-of-run check, after it stopped, counts them): {held}")
    return "\n".join(out)


def save(result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``result`` as ``bench-<run>.json`` and ``latest.json`` in ``out_dir``; return the first path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{result['run']}.json"
    text = json.dumps(result, indent=2, default=str)
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path
