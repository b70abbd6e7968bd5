"""The repository stands alone: a user's clone has no folder beside it and no issue tracker.

Every text file that ships (code, docs, configs, tests, result JSON) is scanned for things that
only make sense on the machine it was written on: absolute paths into someone's home or work
folder, references to folders outside the repository, and citations of internal documents (a
section of an unpublished spec, a numbered issue of a private tracker) that a reader cannot open. Papers are cited by arXiv id and section.
"""
from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv", "venv", ".whl", "tmp",
             "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".json", ".jsonl", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml",
                 ".sh", ".csv", ".tsv", ".rst", ".html", ".j2", ".jinja"}
TEXT_NAMES = {"run", ".gitignore", "LICENSE", "NOTICE", "Makefile"}

# Built from pieces so that this file does not match itself.
_SECTION = "\u00a7"
FORBIDDEN = {
    "absolute machine path": re.compile(r"(?<![\w.~$])/(?:" + "|".join(
        ["wor" + "k", "far" + "m", "roo" + "t", "hom" + "e", "User" + "s", "mn" + "t", "old_roo" + "t"])
        + r")/"),
    "folder outside the repository": re.compile(r"\.\./" + "shared" + r"|\bshared/(?:specs|data|hooks)\b"
                                                r"|\banchors\.md\b|\bdesign\.md\b"),
    "internal spec citation": re.compile(r"\b[Ss]pecs?\b[:,]?\s*(?:" + _SECTION + r"|`*[\w\-]+\.md)"
                                         r"|\bspecs/\w"),
    "internal issue citation": re.compile(r"(?<![\w/])[Ii]ssue\s*#?\s*\d+"),
}


def shipped_text_files() -> list[pathlib.Path]:
    out = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") or part.startswith(".work-")
               for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            out.append(path)
    return sorted(out)


def offences(text: str) -> list[tuple[int, str, str]]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            m = pattern.search(line)
            if m:
                found.append((lineno, what, m.group(0)))
    return found


@pytest.mark.parametrize("text, what", [
    ("see /wor" "k/main/docs/x.md", "absolute machine path"),
    ('"/roo' 't/.venv/bin/python"', "absolute machine path"),
    ("default <repo>/../" "shared/" "data/oop_eval", "folder outside the repository"),
    ("written from the spec " + _SECTION + "3.2", "internal spec citation"),
    ("Spec: ``icl_pomp" ".md`` part A", "internal spec citation"),
    ("fixes iss" "ue 18", "internal issue citation"),
    ("(Iss" "ue #5)", "internal issue citation"),
])
def test_the_scanner_catches_each_kind(text, what):
    assert [w for _, w, _ in offences(text)] == [what]


@pytest.mark.parametrize("text", [
    "Zhong et al. 2024, arXiv:2402.11890, Sec. 3.2, Eq. (5)",
    "the sandbox mounts a private /tmp and hides /proc and /etc/shadow",
    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "a specification of the pruning masks; specific to GPS",
    # joined at run time so that a plain grep for machine paths over the repo stays empty
    "~/" + "work/venv and $HOME/work are a user's choice",
])
def test_the_scanner_lets_ordinary_text_pass(text):
    assert offences(text) == []


def test_nothing_shipped_points_outside_the_repository_or_at_internal_documents():
    files = shipped_text_files()
    assert len(files) > 100, f"the scan found only {len(files)} files under {REPO}"
    report = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, what, match in offences(text):
            report.append(f"{path.relative_to(REPO)}:{lineno}: {what}: {match!r}")
    assert not report, "\n".join(report[:200]) + f"\n({len(report)} in all)"
