"""The documentation builds with --strict and says what the code says.

A broken link, a missing anchor, a page left out of the nav or a snippet that
points at a missing file fails the build; the generated reference tables are
checked against the code they are generated from.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.stack import ROOT

MKDOCS = Path(sys.executable).with_name("mkdocs")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "FUSION_EXAMPLES_PREFIX"}
    env["NO_MKDOCS_2_WARNING"] = "1"
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page(site: Path, path: str) -> str:
    return html.unescape((site / path / "index.html").read_text())


def test_docs_build_strict_and_every_page_is_in_the_nav(site):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)

    def pages(nav):
        for item in nav:
            for value in item.values() if isinstance(item, dict) else [item]:
                yield from pages(value) if isinstance(value, list) else [value]

    in_nav = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav
    for required in ["index.md", "quickstart.md", "concepts.md", "fusion-clj.md", "reference/protocol.md",
                     "reference/settings.md", "reference/cli.md", "reference/api.md", "operations/topics.md",
                     "operations/failures.md", "operations/upgrading.md", "guides/registries.md"]:
        assert required in in_nav


def test_no_page_links_to_a_placeholder_host(site):
    """mkdocs.yml names no repository (``repo_url``) that does not exist, so no page links to one."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    assert not {"repo_url", "repo_name", "edit_uri"} & set(config)
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20
    placeholder = re.compile(r'href="https?://[^"/]*\.invalid\b')
    linking = [str(p.relative_to(site)) for p in pages if placeholder.search(p.read_text())]
    assert not linking, f"pages linking to a placeholder host: {linking}"


def test_readme_links_point_at_pages():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert {"docs/fusion-clj.md", "docs/reference/protocol.md", "docs/index.md"} <= set(links)
    for link in links:
        assert (ROOT / link).is_file(), link


def test_settings_page_lists_every_setting_with_its_default_and_env_var(site):
    from fusion_celery.config import SETTINGS
    sys.path.insert(0, str(ROOT / "tools" / "docs"))
    import hooks
    text = page(site, "reference/settings")
    rows = {r.split("|")[1]: r for r in hooks.settings_table().splitlines()[2:]}
    assert len(rows) == len(SETTINGS)
    for s in SETTINGS:
        row = next(r for r in rows.values() if f"`{s.name}`" in r)
        assert f"`{s.env}`" in row and hooks._code(s.default) in row
        assert f"<code>{s.name}</code>" in text and f"<code>{s.env}</code>" in text
        assert f"<code>{hooks._code(s.default).strip('`')}</code>" in text


def test_every_public_name_is_in_the_api_reference(site):
    import fusion_celery
    text = page(site, "reference/api")
    missing = [name for name in fusion_celery.__all__
               if name not in {"app"} and not re.search(rf'id="fusion_celery\.[\w.]*\b{name}"', text)]
    assert not missing, f"public names without an API entry: {missing}"


def test_every_celery_fusion_command_is_documented(site):
    from fusion_celery.cli import fusion
    text = page(site, "reference/cli")
    for name in getattr(fusion, "commands", {}):
        assert f"<code>{name}</code>" in text, f"`celery fusion {name}` is not in docs/reference/cli.md"


def test_pages_generated_from_code_show_the_examples_deps_graph(site):
    text = page(site, "guides/examples")
    assert '<pre class="mermaid"><code>flowchart LR' in text
    assert "d_fetch --&gt; d_summary" in (site / "guides/examples/index.html").read_text()


def test_pages_with_a_diagram_load_mermaid_from_the_site_and_nothing_from_another_host(site):
    """Mermaid is vendored (tools/docs/hooks.py), not left to Material's CDN; no page loads Google Fonts."""
    with_diagram = 0
    for path in site.rglob("*.html"):
        text = path.read_text()
        scripts = re.findall(r'<script src="([^"]*mermaid[^"]*)"', text)
        if '<pre class="mermaid">' in text:
            with_diagram += 1
            assert len(scripts) == 1 and scripts[0].endswith("assets/vendor/mermaid.min.js"), path
            assert (path.parent / scripts[0]).resolve().is_file(), path
        else:
            assert scripts == [], path
        assert not re.search(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//', text), path
    assert with_diagram >= 5
