"""MkDocs hooks: tables generated from the code, so the reference cannot drift from it.

Markers in the Markdown sources are replaced at build time:

- ``<!-- fusion:settings -->``: every setting of :data:`fusion_celery.config.SETTINGS`
  (name, environment variable, default, environment format, description);
- ``<!-- fusion:celery-defaults -->``: the Celery settings the fusion app changes;
- ``<!-- fusion:cli -->``: usage, help and options of each ``celery fusion`` command,
  read from the click group in :mod:`fusion_celery.cli`;
- ``<!-- fusion:deps-graph module:function JSON -->``: a Mermaid chart of the deps-map that
  ``function`` returns for a message whose data is ``JSON`` (what ``celery fusion graph`` draws).

``tests/test_docs.py`` checks that the built pages hold what these produce.

Mermaid is served by the site itself: MkDocs Material loads it from a CDN unless a global ``mermaid`` is
already defined, so the build adds ``assets/vendor/mermaid.min.js`` to the site and a script that loads it
to each page with a diagram. The file comes from the pinned ``mermaid`` package of the npm registry
(``npm pack``, which needs node and npm) and is kept in ``.cache/docs/`` (ignored by git) for the next
builds. ``tools/docs/check_site.py`` checks in a browser that the diagrams render.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# The major version is the one MkDocs Material asks its CDN for (mermaid@11 in its bundle.*.js).
MERMAID_VERSION = "11.17.2"
MERMAID_INTEGRITY = ("sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg==")
MERMAID_URI = "assets/vendor/mermaid.min.js"
VENDOR_DIR = ROOT / ".cache" / "docs"


def _importable() -> None:
    # Done at render time: MkDocs pops sys.path[0] after loading a hook module.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

MARKERS = ("<!-- fusion:settings -->", "<!-- fusion:celery-defaults -->", "<!-- fusion:cli -->")


def _code(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)
    return f"`{text}`"


def _duration_ms(ms: int) -> str:
    for unit, size in (("days", 86_400_000), ("hours", 3_600_000), ("minutes", 60_000)):
        if ms % size == 0 and ms >= size:
            return f" ({ms // size} {unit})"
    return ""


def env_format(parse: Any) -> str:
    """How the environment variable of a setting is written."""
    from fusion_celery import config
    return {
        str: "text",
        int: "integer",
        float: "number",
        config._csv: "comma-separated list",
        config._json_object: "JSON object",
        config._bool: "`1`, `true`, `yes` or `on` for true; anything else is false",
    }.get(parse, getattr(parse, "__name__", "text"))


def settings_table() -> str:
    from fusion_celery.config import SETTINGS
    rows = ["| Setting (`app.conf`) and environment variable | Default | Environment format | What it does |",
            "|---|---|---|---|"]
    for s in SETTINGS:
        default = _code(s.default)
        if isinstance(s.default, int) and not isinstance(s.default, bool) and s.name.endswith("_ms"):
            default += _duration_ms(s.default)
        rows.append(f"| `{s.name}`<br>`{s.env}` | {default} | {env_format(s.parse)} | "
                    f"{s.doc.replace('|', '&#124;')} |")
    return "\n".join(rows)


def celery_defaults_table() -> str:
    from fusion_celery.application import _CELERY_DEFAULTS
    rows = ["| Celery setting | fusion's default |", "|---|---|"]
    for name, value in _CELERY_DEFAULTS.items():
        shown = f"`{value.days} days`" if isinstance(value, timedelta) else _code(value)
        url = f"https://docs.celeryq.dev/en/stable/userguide/configuration.html#{name.replace('_', '-')}"
        rows.append(f"| [`{name}`]({url}) | {shown} |")
    return "\n".join(rows)


def cli_reference() -> str:
    import click

    from fusion_celery.cli import fusion
    commands = getattr(fusion, "commands", {})
    if not commands:
        return ('!!! warning "No commands in this build"\n'
                "    The `fusion` command group of this build defines no subcommands yet.")
    out = []
    ctx = click.Context(fusion, info_name="celery -A fusion_celery fusion")
    for name in sorted(commands):
        cmd = commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out.append(f"### `{name}`\n")
        out.append(f"```text\n{cmd.get_usage(sub)}\n```\n")
        out.append(f"{(cmd.help or '').strip()}\n")
        rows = []
        for p in cmd.params:
            if isinstance(p, click.Argument):
                rows.append(f"| `{p.human_readable_name}` | argument{'' if p.required else ', optional'} | "
                            f"{_code(p.default) if p.default is not None and not p.required else ''} | |")
            else:
                opts = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                if isinstance(p.type, click.Choice):
                    kind = "one of " + ", ".join(f"`{c}`" for c in p.type.choices)
                else:
                    kind = "flag" if p.is_flag else str(p.type.name)
                default = p.default
                if p.is_flag and p.secondary_opts:  # --wait/--no-wait: name the default side
                    shown = f"`{(p.opts if default else p.secondary_opts)[0]}`"
                elif p.is_flag or default is None or "Sentinel" in repr(default):
                    shown = ""
                else:
                    shown = _code(default)
                rows.append(f"| {opts} | {kind} | {shown} | {(p.help or '').replace('|', '&#124;')} |")
        if rows:
            out.append("| Parameter | Kind | Default | Meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


_DEPS_GRAPH = re.compile(r"<!-- fusion:deps-graph (\S+):(\w+) (.*?) -->")


def deps_graph(match: re.Match[str]) -> str:
    import importlib

    from fusion_celery import DepsGraph, Message
    fn = getattr(importlib.import_module(match.group(1)), match.group(2))
    data = json.loads(match.group(3))
    return "```mermaid\n" + DepsGraph(fn(Message(topic="docs", data=data))).to_mermaid() + "\n```"


def render(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated table."""
    _importable()
    if MARKERS[0] in markdown:
        markdown = markdown.replace(MARKERS[0], settings_table())
    if MARKERS[1] in markdown:
        markdown = markdown.replace(MARKERS[1], celery_defaults_table())
    if MARKERS[2] in markdown:
        markdown = markdown.replace(MARKERS[2], cli_reference())
    return _DEPS_GRAPH.sub(deps_graph, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return render(markdown)


def mermaid_js(cache: Path = VENDOR_DIR) -> Path:
    """The path of ``dist/mermaid.min.js`` of the pinned mermaid package, fetched with ``npm pack`` if missing.

    The tarball is checked against :data:`MERMAID_INTEGRITY` before the file is taken from it; the file is
    put in place with a rename, so builds running side by side (the docs tests, ``make docs``) never read
    half of it.
    """
    target = cache / f"mermaid-{MERMAID_VERSION}" / "mermaid.min.js"
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"building the docs needs npm to fetch mermaid {MERMAID_VERSION} "
                           "(apt-get install nodejs npm), or the file in place: " + str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([npm, "pack", f"mermaid@{MERMAID_VERSION}", "--pack-destination", tmp,
                               "--silent"], capture_output=True, text=True, timeout=300)
        tarball = Path(tmp) / f"mermaid-{MERMAID_VERSION}.tgz"
        if proc.returncode != 0 or not tarball.is_file():
            raise RuntimeError(f"npm pack mermaid@{MERMAID_VERSION} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != MERMAID_INTEGRITY:
            raise RuntimeError(f"mermaid-{MERMAID_VERSION}.tgz has integrity {digest}, "
                               f"not the pinned {MERMAID_INTEGRITY}")
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/dist/mermaid.min.js")
            assert member is not None
            part = Path(tmp) / "mermaid.min.js"
            part.write_bytes(member.read())
        os.replace(part, target)
    return target


def on_post_page(output: str, page: Any, config: Any, **kwargs: Any) -> str:
    # Only the pages with a diagram load mermaid (3.5 MB); synchronous, at the end of the body like an
    # extra_javascript, so the global is defined before Material's bundle renders the diagrams.
    if '<pre class="mermaid">' not in output:
        return output
    from mkdocs.utils import get_relative_url
    script = f'<script src="{get_relative_url(MERMAID_URI, page.url)}"></script>'
    head, sep, tail = output.rpartition("</body>")
    return head + script + "\n" + sep + tail if sep else output + script


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File
    files.append(File.generated(config, MERMAID_URI, abs_src_path=str(mermaid_js())))
    return files
