"""Comments, docs and tests stand on their own or cite docs/compatibility.md: nothing in the repository refers to a
file outside it, and every section (and section 12 item) that a file cites exists."""

import os
import re
import subprocess

from tests.conftest import REPO

COMPAT_DOC = os.path.join("docs", "compatibility.md")
# Built from pieces so that this file does not match itself.
OUTSIDE_REFERENCES = [
    re.compile(re.escape("REFERENCE" + ".md")),
    re.compile("REFERENCE" + r" §"),
    re.compile(r"\.\./" + "shared"),
    re.compile("/work" + r"/(shared|main|wt)\b"),
]
CITATION = re.compile(r"docs/compatibility\.md,? sections? (\d+(?:\.\d+)?)(?:-(\d+))?(?:, items? (\d+))?")


def tracked_text_files():
    """(path, text) of every file git tracks (or, outside a git checkout, every file but .venv/.git), text only."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        paths = [p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = [os.path.relpath(os.path.join(root, f), REPO) for root, dirs, files in os.walk(REPO)
                 if not {".git", ".venv"} & set(os.path.relpath(root, REPO).split(os.sep)) for f in files]
    for path in paths:
        full = os.path.join(REPO, path)
        if not os.path.isfile(full):
            continue  # deleted in the working tree
        with open(full, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # binary: images, checkpoints
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def compat_sections():
    """Section numbers ("1", "1.2", ...) of docs/compatibility.md and the item numbers of its section 12 list."""
    with open(os.path.join(REPO, COMPAT_DOC)) as f:
        text = f.read()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))
    section_12 = text.split("\n## 12.", 1)[1].split("\n## ", 1)[0]
    items = {int(n) for n in re.findall(r"^(\d+)\. \*\*", section_12, flags=re.M)}
    return sections, items


def test_no_file_refers_outside_the_repository():
    hits = []
    for path, text in tracked_text_files():
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE_REFERENCES):
                hits.append(f"{path}:{number}: {line.strip()[:100]}")
    assert not hits, "files that cite something outside the repository:\n" + "\n".join(hits)


def test_cited_compatibility_sections_exist():
    sections, items = compat_sections()
    assert {"1", "1.2", "2.1", "5", "10.3", "12", "13"} <= sections and len(items) >= 15
    bad = []
    for path, text in tracked_text_files():
        # A citation may wrap across lines in comments and docstrings.
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)
        for first, last, item in CITATION.findall(flat):
            cited = [first] + ([str(n) for n in range(int(first) + 1, int(last) + 1)] if last else [])
            bad += [f"{path}: section {s}" for s in cited if s not in sections]
            if item and (first != "12" or int(item) not in items):
                bad.append(f"{path}: section {first}, item {item}")
    assert not bad, "citations of docs/compatibility.md that name no section or item:\n" + "\n".join(bad)


def test_readme_fix_list_numbers_are_items_of_section_12():
    _, items = compat_sections()
    with open(os.path.join(REPO, "README.md")) as f:
        fixed = f.read().split("Fixed (", 1)[1].split("\n## ", 1)[0]
    cited = {int(n) for group in re.findall(r"(?<!\[)\[(\d+(?:, \d+)*)\](?!\])", fixed) for n in group.split(", ")}
    assert cited and cited <= items, sorted(cited - items)


def test_files_named_in_the_compatibility_doc_exist():
    with open(os.path.join(REPO, COMPAT_DOC)) as f:
        text = f.read()
    top_level = set(os.listdir(REPO))
    named = set(re.findall(r"(?<![\w<>./-])((?:[\w-]+/)+[\w.-]+\.(?:py|yaml|json|txt|md))", text))
    named = {p for p in named if p.split("/")[0] in top_level}
    assert len(named) >= 10
    assert not [p for p in sorted(named) if not os.path.exists(os.path.join(REPO, p))]
