"""Check the built docs site in a real browser: Debian's Chromium, headless, driven by Playwright.

    python tools/docs/check_site.py [SITE_DIR]      (default: site/, what ``make docs`` builds)

The site is served on a free loopback port (``http.server`` in a thread) and every HTML page of it is
opened. For each page the check asserts that

- it loads with HTTP 200, and nothing it loads (scripts, styles, images, the search index) fails;
- it requests nothing outside the site (no CDN: such requests are refused and reported);
- the browser reports no JavaScript error (console errors, uncaught exceptions);
- every Mermaid block of the page became an ``<svg>`` (and not Mermaid's error diagram);
- every ``<img>`` loaded (``naturalWidth > 0``);
- every link to the site points at a file that exists and, with a ``#fragment``, at an element id that exists
  on the page it points at (ids as the browser has them, after the page's scripts ran).

Each wait has a deadline; a failure names the page and the link, image or error. Exit status 1 when
anything failed (or the browser did not start), 2 when there is no built site or no Chromium
(``apt-get install -y chromium``; ``make docs-check`` installs it). Playwright's own browser downloads are
never used: the browser is ``/usr/bin/chromium`` (``--chromium`` or ``FUSION_CHROMIUM`` to change it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FUSION_CHROMIUM", "/usr/bin/chromium")

# Material renders a diagram into a closed shadow root; opened here so that the check can see the SVG.
OPEN_SHADOW_ROOTS = """
(() => {
  const attach = Element.prototype.attachShadow;
  Element.prototype.attachShadow = function (init) { return attach.call(this, {...init, mode: "open"}); };
})();
"""

# Every diagram rendered: as many div.mermaid as the served HTML had pre.mermaid, each holding an svg.
DIAGRAMS_DONE = """
(expected) => {
  const done = [...document.querySelectorAll("div.mermaid")]
    .filter(d => d.shadowRoot && d.shadowRoot.querySelector("svg"));
  return done.length >= expected;
}
"""

DIAGRAMS = """
() => [...document.querySelectorAll("div.mermaid")].map(d => {
  const svg = d.shadowRoot && d.shadowRoot.querySelector("svg");
  return {svg: !!svg, error: !!svg && svg.getAttribute("aria-roledescription") === "error"};
})
"""

IMAGES_SETTLED = """
() => [...document.images].every(i => i.complete)
"""

# What the checks after the crawl need from a page, read from its DOM once its scripts ran.
PAGE_DATA = """
() => {
  const ids = [...document.querySelectorAll("[id]")].map(e => e.id);
  const names = [...document.querySelectorAll("a[name]")].map(e => e.getAttribute("name"));
  return {
    ids: ids.concat(names),
    links: [...document.querySelectorAll("a[href]")].map(a => ({href: a.href, raw: a.getAttribute("href")})),
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, raw: i.getAttribute("src"),
                                            width: i.naturalWidth})),
  };
}
"""


@dataclass
class Page:
    """One page as the browser saw it."""

    path: str  # relative to the site root, e.g. "guides/flower/index.html"
    status: int | None = None
    ids: set[str] = field(default_factory=set)
    links: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    diagrams: int = 0


@dataclass
class Report:
    pages: dict[str, Page] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    links_checked: int = 0

    def add(self, page: str, what: str) -> None:
        self.problems.append(f"{page}: {what}")

    def summary(self) -> str:
        images = sum(len(p.images) for p in self.pages.values())
        diagrams = sum(p.diagrams for p in self.pages.values())
        return (f"{len(self.pages)} pages, {self.links_checked} links to the site, {images} images, "
                f"{diagrams} Mermaid diagrams: {len(self.problems)} problem(s)")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # The browser dropping a connection (a request it aborted) is not a failure of the site.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free loopback port; yields its base URL (ending in ``/``)."""
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, name="check-site-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def html_pages(site: Path) -> list[str]:
    return sorted(str(p.relative_to(site)).replace(os.sep, "/") for p in site.rglob("*.html"))


def target_file(site: Path, base: str, url: str) -> tuple[str, str] | None:
    """(file relative to the site, fragment) that a URL of the site points at; None for another site."""
    parts = urlsplit(url)
    root = urlsplit(base)
    if (parts.scheme, parts.netloc) != (root.scheme, root.netloc) or not parts.path.startswith(root.path):
        return None
    rel = unquote(parts.path[len(root.path):])
    if rel == "" or rel.endswith("/"):
        rel += "index.html"
    elif (site / rel).is_dir():
        rel += "/index.html"
    return rel, unquote(parts.fragment)


def check_links(site: Path, base: str, report: Report) -> None:
    """Every link and image of the site's pages points at a file that exists (and an id that exists)."""
    for page in report.pages.values():
        for link in page.links:
            target = target_file(site, base, link["href"])
            if target is None:
                continue
            report.links_checked += 1
            rel, fragment = target
            if not (site / rel).is_file():
                report.add(page.path, f"broken link {link['raw']!r}: no {rel} in the site")
                continue
            if not fragment:
                continue
            linked = report.pages.get(rel)
            if linked is None:
                report.add(page.path, f"link {link['raw']!r}: #{fragment} on {rel}, which is not an HTML page")
            elif fragment not in linked.ids:
                report.add(page.path, f"broken anchor {link['raw']!r}: {rel} has no element with id {fragment!r}")
        for image in page.images:
            if image["width"] <= 0:
                report.add(page.path, f"image {image['raw']!r} did not load ({image['src']})")


def check_site(site: Path, *, chromium: str = CHROMIUM, timeout: float = 60.0,
               log=print) -> Report:  # noqa: ANN001 - any callable taking a string
    """Open every page of the built site ``site`` in headless Chromium; the problems found are in the report."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    site = site.resolve()
    if not (site / "index.html").is_file():
        raise FileNotFoundError(f"{site} holds no built site (no index.html): run make docs first")
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        raise FileNotFoundError(f"no Chromium at {chromium}: apt-get install -y chromium (make docs-check does)")
    report = Report()
    deadline_ms = timeout * 1000
    with serve(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context(service_workers="block")
            context.add_init_script(OPEN_SHADOW_ROOTS)
            context.set_default_timeout(deadline_ms)
            outside: list[str] = []

            def route(r) -> None:  # noqa: ANN001 - a playwright Route
                if r.request.url.startswith(base) or r.request.url.startswith("data:"):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort("blockedbyclient")

            context.route("**/*", route)
            for path in html_pages(site):
                started = time.monotonic()
                page = Page(path)
                report.pages[path] = page
                errors: list[str] = []
                failed: list[str] = []
                outside.clear()
                tab = context.new_page()
                # A resource that failed to load is reported once, with its URL, by the handlers of responses,
                # failed requests and route(), not also by the console error the browser logs for it.
                tab.on("console", lambda m, errors=errors: errors.append(f"console {m.type}: {m.text}")
                       if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
                tab.on("pageerror", lambda e, errors=errors: errors.append(f"uncaught {e.name}: {e.message}"))
                tab.on("response", lambda r, failed=failed: failed.append(f"HTTP {r.status} for {r.url}")
                       if r.status >= 400 and r.url.startswith(base) else None)
                tab.on("requestfailed", lambda r, failed=failed: failed.append(
                    f"request failed ({r.failure}) for {r.url}")
                    if r.url.startswith(base) and not any(f.endswith(f" for {r.url}") for f in failed) else None)
                try:
                    response = tab.goto(urljoin(base, path), wait_until="load")
                    page.status = response.status if response else None
                    if page.status != 200:
                        report.add(path, f"HTTP {page.status}")
                    body = response.text() if response else ""
                    page.diagrams = body.count('<pre class="mermaid">')
                    if page.diagrams:
                        try:
                            tab.wait_for_function(DIAGRAMS_DONE, arg=page.diagrams)
                        except PlaywrightTimeout:
                            pass  # reported below, diagram by diagram
                        rendered = tab.evaluate(DIAGRAMS)
                        missing = page.diagrams - sum(d["svg"] for d in rendered)
                        if missing > 0:
                            report.add(path, f"{missing} of {page.diagrams} Mermaid diagram(s) did not become an "
                                             f"<svg> within {timeout:.0f}s")
                        for n, d in enumerate(rendered, 1):
                            if d["error"]:
                                report.add(path, f"Mermaid diagram {n} rendered as Mermaid's error diagram")
                    # Lazy images load only when scrolled to: load all of them now.
                    tab.evaluate("() => document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
                    try:
                        tab.wait_for_function(IMAGES_SETTLED)
                    except PlaywrightTimeout:
                        report.add(path, f"images still loading after {timeout:.0f}s")
                    data = tab.evaluate(PAGE_DATA)
                    page.ids = set(data["ids"])
                    page.links = data["links"]
                    page.images = data["images"]
                except PlaywrightError as e:
                    report.add(path, f"did not load: {e}")
                finally:
                    tab.close()
                for what in dict.fromkeys(errors + failed):  # each once, in the order seen
                    times = (errors + failed).count(what)
                    report.add(path, what + (f" ({times} times)" if times > 1 else ""))
                for url in sorted(set(outside)):
                    report.add(path, f"requested a URL outside the site (refused): {url}")
                log(f"  {path}: {time.monotonic() - started:.1f}s, {page.diagrams} diagram(s), "
                    f"{len(page.images)} image(s), {len(page.links)} link(s)")
        finally:
            browser.close()
    check_links(site, base, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default=str(ROOT / "site"), help="the built site (default: site/)")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser to drive (default: {CHROMIUM})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each condition")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        report = check_site(Path(args.site), chromium=args.chromium, timeout=args.timeout)
    except FileNotFoundError as e:
        print(f"check_site: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"FAIL {problem}")
    print(f"check_site: {report.summary()} in {time.monotonic() - started:.0f}s")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
