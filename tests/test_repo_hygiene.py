"""Every file git tracks is free of merge-conflict markers.

A conflict that was committed unresolved leaves git's marker lines in the file:
``<<<<<<< ours``, optionally ``||||||| base``, ``=======``, ``>>>>>>> theirs``.
A line of seven ``=`` alone is also a Markdown or reStructuredText heading
underline, so a file counts as conflicted only when it holds both a
``<<<<<<< `` line and a ``>>>>>>> `` line; then each marker line of its
conflicts is reported with its file and line number.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.stack import ROOT

OPEN, BASE, MIDDLE, CLOSE = "<" * 7, "|" * 7, "=" * 7, ">" * 7


def conflict_markers(text: str) -> list[tuple[int, str]]:
    """The merge-conflict marker lines of ``text`` as ``(line number, line)``.

    Empty unless ``text`` holds an opening and a closing marker.  Every opening and
    closing marker is reported; a ``|||||||`` or ``=======`` line only between an
    opening marker and the next closing one, so a heading underline elsewhere in a
    conflicted file is not.
    """
    lines = text.splitlines()
    if not any(line.startswith(OPEN + " ") for line in lines) or not any(
            line.startswith(CLOSE + " ") for line in lines):
        return []
    found, inside = [], False
    for number, line in enumerate(lines, 1):
        if line.startswith(OPEN + " "):
            inside = True
        elif line.startswith(CLOSE + " "):
            inside = False
        elif not (inside and (line.startswith(BASE) or line.rstrip("\r") == MIDDLE)):
            continue
        found.append((number, line))
    return found


def tracked_files(root: Path) -> list[Path]:
    """The files git tracks under ``root`` that exist in the work tree."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [root / name for name in out.decode().split("\0") if name and (root / name).is_file()]


def markers_in(root: Path) -> list[str]:
    """``path:line: marker`` for every conflict marker in a text file git tracks under ``root``."""
    found = []
    for path in tracked_files(root):
        raw = path.read_bytes()
        if b"\0" in raw:  # binary
            continue
        for number, line in conflict_markers(raw.decode("utf-8", errors="replace")):
            found.append(f"{path.relative_to(root)}:{number}: {line}")
    return found


def test_no_tracked_file_holds_merge_conflict_markers():
    assert len(tracked_files(ROOT)) > 50, "git ls-files lists the repository's files"
    found = markers_in(ROOT)
    assert not found, "unresolved merge conflicts:\n" + "\n".join(found)


def test_a_real_merge_conflict_is_reported_by_file_and_line(tmp_path):
    def git(*args: str) -> subprocess.CompletedProcess:
        config = ["user.name=t", "user.email=t@t", "init.defaultBranch=main", "merge.conflictStyle=diff3",
                  "commit.gpgsign=false"]
        options = [arg for item in config for arg in ("-c", item)]
        return subprocess.run(["git", "-C", str(tmp_path), *options, *args], capture_output=True, text=True)

    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    git("init", "-q")
    page.write_text("Title\n=======\n\nintro\n\nsame line\n")
    git("add", ".")
    git("commit", "-q", "-m", "base")
    git("checkout", "-q", "-b", "zk")
    page.write_text("Title\n=======\n\nintro\n\ntheirs\n")
    git("commit", "-q", "-am", "theirs")
    git("checkout", "-q", "main")
    page.write_text("Title\n=======\n\nintro\n\nours\n")
    git("commit", "-q", "-am", "ours")
    assert git("merge", "-q", "zk").returncode != 0, "the two branches conflict"
    git("commit", "-q", "-am", "a merge committed with its conflict")

    found = markers_in(tmp_path)
    assert [entry.split(": ", 1)[0] for entry in found] == [
        "docs/page.md:6", "docs/page.md:8", "docs/page.md:10", "docs/page.md:12"]
    assert found[0] == f"docs/page.md:6: {OPEN} HEAD"
    assert found[-1] == f"docs/page.md:12: {CLOSE} zk"
    assert "docs/page.md:2" not in " ".join(found), "the heading underline above is no marker"


def test_a_heading_underline_alone_is_no_conflict():
    rst = "Title\n=======\n\ntext\n"
    assert conflict_markers(rst) == []
    assert conflict_markers(f"{OPEN} HEAD\nours\n{MIDDLE}\ntheirs\n") == [], "no closing marker: not a conflict"
    assert conflict_markers(f"{OPEN} HEAD\nours\n{MIDDLE}\ntheirs\n{CLOSE} zk\n") == [
        (1, f"{OPEN} HEAD"), (3, MIDDLE), (5, f"{CLOSE} zk")]
