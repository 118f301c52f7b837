"""Screenshot the trace of one real pipeline call, as Jaeger received it, for docs/assets/trace.png.

What it runs, on the local stack (``make up``):

* Jaeger (v2, in-memory storage) with OTLP/HTTP and its query API on free ports of 127.0.0.1;
* the plain example service (``examples.plain_service.language``) exporting its spans to Jaeger;
* a real ``celery worker`` (prefork) serving the math example and ``tools/docs/trace_demo.py``, with
  ``FUSION_TRACING=1`` and ``OTEL_TRACES_EXPORTER=otlp`` pointed at Jaeger;
* one call of the ``report`` reactor through a :class:`~fusion_celery.Pipeline` from this process,
  inside a span of its own (a user's application).

It then reads the trace back from Jaeger's query API (``/api/traces/<id>``), lays it out as a
waterfall page, and has Debian's chromium (through Playwright, as tools/docs/check_site.py does)
take the screenshot.  The waterfall is drawn here because a Jaeger built from its Go module has
no UI assets (they come from the separate jaeger-ui build); the spans, their timing and their
parents are Jaeger's.

    python tools/docs/screenshot_trace.py --jaeger /path/to/jaeger [--out docs/assets/trace.png]

Jaeger is built from the Go module proxy (``go install`` refuses its module's replace directives)::

    go mod download -json github.com/jaegertracing/jaeger@v1.76.0   # prints its Dir
    cp -r <Dir> jaeger-src && chmod -R u+w jaeger-src && cd jaeger-src && go build -o jaeger ./cmd/jaeger
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FUSION_CHROMIUM", "/usr/bin/chromium")
COLORS = {"pipeline-client": "#7b61ff", "fusion-worker": "#1f77b4", "language-service": "#e4572e"}

JAEGER_CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 1000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def stack_env() -> dict[str, str]:
    path = ROOT / ".stack" / "env"
    if not path.is_file():
        raise SystemExit("no .stack/env: start the local stack first (make up)")
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip().strip("'\"") for k, v in pairs}


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def call(env: dict[str, str], otlp: str, prefix: str) -> str:
    """Two calls of ``report``, each inside a span of this process's own; the second's trace id (the first
    one warms the worker up: its Kafka clients, topic metadata and intake fetch)."""
    os.environ.update({k: env[k] for k in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")})
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "pipeline-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp)))
    trace.set_tracer_provider(provider)
    from fusion_celery import Pipeline, create_app
    client = create_app("trace-screenshot", broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"],
                        set_as_current=False)
    client.conf.fusion_tracing = True
    for _ in range(2):
        with trace.get_tracer("screenshot").start_as_current_span("report a document") as span:
            answer = Pipeline(f"{prefix}report", app=client).delay(
                {"numbers": [1, 2, 3], "text": "the cat and the dog"}, timeout=60).get(timeout=90)
    print("answer:", json.dumps(answer))
    provider.shutdown()
    client.close()
    return f"{span.get_span_context().trace_id:032x}"


def waterfall(trace: dict[str, Any]) -> str:
    """The trace (Jaeger's JSON) as an HTML waterfall: one row per span, children under their parent."""
    spans = {s["spanID"]: s for s in trace["spans"]}
    services = {pid: p["serviceName"] for pid, p in trace["processes"].items()}

    def parent(s: dict[str, Any]) -> str | None:
        return next((r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF"), None)

    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans.values():
        kids.setdefault(parent(s) if parent(s) in spans else None, []).append(s)
    start = min(s["startTime"] for s in spans.values())
    end = max(s["startTime"] + s["duration"] for s in spans.values())
    total = max(1, end - start)
    rows: list[str] = []

    def kind(s: dict[str, Any]) -> str:
        return next((t["value"] for t in s.get("tags", []) if t["key"] == "span.kind"), "internal")

    def walk(s: dict[str, Any], depth: int) -> None:
        service = services[s["processID"]]
        left, width = (s["startTime"] - start) / total * 100, max(0.4, s["duration"] / total * 100)
        # The duration right of the bar, or left of it when the bar ends near the right edge.
        label = f"left:{left + width:.2f}%" if left + width < 85 else f"right:{100 - left:.2f}%;margin-right:6px"
        links = " ↗ linked" if any(r["refType"] == "FOLLOWS_FROM" for r in s.get("references", [])) else ""
        rows.append(
            f'<div class="row"><div class="name" style="padding-left:{8 + depth * 16}px">'
            f'<span class="dot" style="background:{COLORS.get(service, "#888")}"></span>'
            f'<b>{html.escape(service)}</b> {html.escape(s["operationName"])}'
            f'<span class="kind">{html.escape(kind(s))}{links}</span></div>'
            f'<div class="lane"><div class="bar" style="left:{left:.2f}%;width:{width:.2f}%;'
            f'background:{COLORS.get(service, "#888")}"></div>'
            f'<span class="ms" style="{label}">{s["duration"] / 1000:.1f} ms</span></div></div>')
        for child in sorted(kids.get(s["spanID"], []), key=lambda c: c["startTime"]):
            walk(child, depth + 1)

    for root in sorted(kids.get(None, []), key=lambda c: c["startTime"]):
        walk(root, 0)
    legend = " ".join(f'<span class="dot" style="background:{c}"></span>{html.escape(n)}' for n, c in COLORS.items())
    return f"""<!doctype html><meta charset="utf-8"><style>
body {{ font: 13px -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 16px; margin: 0 0 4px; }} .meta {{ color: #555; margin-bottom: 10px; }}
.row {{ display: flex; border-bottom: 1px solid #eee; height: 24px; align-items: center; }}
.name {{ width: 610px; flex: none; box-sizing: border-box; white-space: nowrap; overflow: hidden;
         text-overflow: ellipsis; }}
.lane {{ position: relative; flex: 1; height: 24px; background: repeating-linear-gradient(90deg, #fafafa 0 10%,
        #f3f3f3 10% 10.1%); }}
.bar {{ position: absolute; top: 6px; height: 12px; border-radius: 2px; opacity: .85; }}
.ms {{ position: absolute; top: 4px; margin-left: 6px; color: #555; font-size: 11px; white-space: nowrap; }}
.dot {{ display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin: 0 5px 0 2px; }}
.kind {{ color: #888; font-size: 11px; margin-left: 6px; }}
</style>
<h1>Trace {trace['traceID']}</h1>
<div class="meta">{len(spans)} spans from {len(set(services.values()))} services, {total / 1000:.1f} ms
&nbsp;·&nbsp; read from Jaeger's query API &nbsp;·&nbsp; {legend}</div>
{''.join(rows)}
"""


def screenshot(page_html: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        path = Path(tmp) / "trace.html"
        path.write_text(page_html)
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 400}, device_scale_factor=1)
        page.goto(path.as_uri())
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jaeger", default=shutil.which("jaeger"), help="the jaeger (v2) binary")
    parser.add_argument("--out", default=str(ROOT / "docs" / "assets" / "trace.png"))
    args = parser.parse_args(argv)
    if not args.jaeger:
        raise SystemExit("no jaeger binary: give --jaeger (see this script's docstring to build one)")
    stack = stack_env()
    work = Path(tempfile.mkdtemp(prefix="fusion-trace-shot-"))
    ports = {"otlp": free_port(), "query": free_port(), "query_grpc": free_port()}
    (work / "jaeger.yaml").write_text(JAEGER_CONFIG.format(**ports))
    otlp = f"http://127.0.0.1:{ports['otlp']}/v1/traces"
    api = f"http://127.0.0.1:{ports['query']}/api"
    run = uuid.uuid4().hex[:8]
    base = stack["CELERY_BROKER_URL"].rsplit("/", 1)[0]
    env = {**os.environ, **stack, "PYTHONPATH": str(ROOT), "FUSION_EXAMPLES_PREFIX": f"demo{run[:4]}.",
           "CELERY_BROKER_URL": f"{base}/8", "CELERY_RESULT_BACKEND": f"{base}/9",
           "FUSION_REGISTRY_URL": f"kafka://fusion.waits.tracedemo-{run}",
           "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp,
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start([args.jaeger, "--config", f"file:{work / 'jaeger.yaml'}"], env, work / "jaeger.log"))
        wait_for(lambda: get_json(f"{api}/services"), 60, "Jaeger")
        procs.append(start([sys.executable, "-m", "examples.plain_service.language"],
                           {**env, "OTEL_SERVICE_NAME": "language-service"}, work / "service.log"))
        wait_for(lambda: b"serving topic" in (work / "service.log").read_bytes(), 60, "the language service")
        worker_log = work / "worker.log"
        procs.append(start([sys.executable, "-m", "celery", "-A", "fusion_celery", "worker", "-P", "prefork", "-c",
                            "2", "-n", f"tracedemo-{run}@localhost", "-l", "info", "--without-mingle",
                            "--without-gossip"],
                           {**env, "FUSION_IMPORTS": "examples.math.reactors,tools.docs.trace_demo",
                            "FUSION_TRACING": "1", "OTEL_SERVICE_NAME": "fusion-worker"}, worker_log))
        wait_for(lambda: b"fusion-celery: serving" in worker_log.read_bytes(), 120, f"the worker (log {worker_log})")
        trace_id = call(env, otlp, env["FUSION_EXAMPLES_PREFIX"])
        # Every process's spans, the last reply's included (it ends after the caller has its answer).
        trace = wait_for(lambda: (t := get_json(f"{api}/traces/{trace_id}")["data"]) and len(t[0]["spans"]) >= 20
                         and t[0], 60, "the trace in Jaeger")
        (work / "trace.json").write_text(json.dumps(trace, indent=1))
        out = Path(args.out)
        screenshot(waterfall(trace), out)
        print(f"{len(trace['spans'])} spans of trace {trace_id}; screenshot {out}; Jaeger's JSON {work}/trace.json")
    finally:
        for proc in reversed(procs):
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
