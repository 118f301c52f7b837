"""tools/docs/check_site.py finds what is broken in a site, in a real browser.

A tiny hand-made site: one page where everything works (a link to an anchor that exists, an image that
loads, a Mermaid diagram rendered the way MkDocs Material renders it, into a closed shadow root, with the
mermaid build the docs vendor), and one page with one of each fault. The tests marked ``browser`` drive
Debian's Chromium: ``make docs-check`` runs them; a missing Chromium fails them, it never skips them.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest
from support.stack import ROOT


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check_site = _load("check_site", ROOT / "tools" / "docs" / "check_site.py")


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


# What Material's bundle does with a diagram: render it with the global mermaid into a closed shadow root.
RENDER = """
<script src="mermaid.min.js"></script>
<script>
mermaid.initialize({startOnLoad: false});
document.querySelectorAll("pre.mermaid").forEach(async (pre, n) => {
  const {svg} = await mermaid.render("m" + n, pre.textContent);
  const div = document.createElement("div");
  div.className = "mermaid";
  div.attachShadow({mode: "closed"}).innerHTML = svg;
  pre.replaceWith(div);
});
</script>
"""

GOOD = f"""<!doctype html><html><head><title>ok</title></head><body>
<h1 id="top">ok</h1>
<a href="bad.html">the other page</a> <a href="./">home</a> <a href="#here">below</a>
<a href="https://example.org/elsewhere">another site is not checked</a>
<img src="img/dot.png" alt="dot">
<pre class="mermaid">graph LR
  A --> B</pre>
<h2 id="here">here</h2>
{RENDER}
</body></html>"""

BAD = """<!doctype html><html><head><title>bad</title></head><body>
<a href="missing/">a page that does not exist</a>
<a href="index.html#nowhere">an anchor that does not exist</a>
<a href="index.html#here">an anchor that exists</a>
<img src="img/missing.png" alt="missing">
<img src="https://unpkg.com/some-cdn-image.png" alt="from a CDN">
<pre class="mermaid">graph LR
  A --> B</pre>
<script>throw new Error("boom in a page script");</script>
</body></html>"""


@pytest.fixture
def tiny_site(tmp_path: Path) -> Path:
    hooks = _load("fusion_docs_hooks", ROOT / "tools" / "docs" / "hooks.py")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "dot.png").write_bytes(png_1x1())
    (tmp_path / "mermaid.min.js").write_bytes(hooks.mermaid_js().read_bytes())
    (tmp_path / "index.html").write_text(GOOD)
    (tmp_path / "bad.html").write_text(BAD)
    return tmp_path


@pytest.mark.browser
def test_a_working_page_has_no_problem_and_each_fault_is_reported(tiny_site):
    report = check_site.check_site(tiny_site, timeout=10, log=lambda line: None)
    good = [p for p in report.problems if p.startswith("index.html:")]
    assert good == []
    assert report.pages["index.html"].diagrams == 1
    assert report.pages["index.html"].images[0]["width"] == 1
    bad = "\n".join(p for p in report.problems if p.startswith("bad.html:"))
    assert "broken link 'missing/': no missing/index.html in the site" in bad
    assert "broken anchor 'index.html#nowhere': index.html has no element with id 'nowhere'" in bad
    assert "index.html#here" not in bad
    assert "image 'img/missing.png' did not load" in bad
    assert "HTTP 404 for http://127.0.0.1:" in bad
    assert "requested a URL outside the site (refused): https://unpkg.com/some-cdn-image.png" in bad
    assert "image 'https://unpkg.com/some-cdn-image.png' did not load" in bad
    assert "1 of 1 Mermaid diagram(s) did not become an <svg>" in bad
    assert "boom in a page script" in bad
    assert report.links_checked == 6
    assert len(report.problems) == 8, report.problems


def test_a_missing_chromium_is_an_error_not_a_skip(tiny_site, tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        check_site.check_site(tiny_site, chromium=str(tmp_path / "no-chromium"))
    assert check_site.main([str(tiny_site), "--chromium", str(tmp_path / "no-chromium")]) == 2
