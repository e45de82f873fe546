"""The documentation ships with the code: no reference to a file outside the repository, no
broken relative link or cited section, README short enough to read, and the test command that
CI runs still where `.ci/run` looks for it."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
METHOD = os.path.join(ROOT, "docs", "method.md")
MAX_README_LINES = 150
# spelled in pieces so that this file does not match itself
FORBIDDEN = ("..".encode() + b"/shared", b"DESIGN" + b".md")
SKIP_DIRS = {".git", "runs", "workdirs", "build", "__pycache__", ".pytest_cache",
             ".ipynb_checkpoints"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
SECTION_CITE = re.compile(r"docs/method\.md §(\d+(?:\.\d+)?)")


def tracked_files():
  """The repository's files: git's list when this is a checkout, else a walk of the tree."""
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    files = [f for f in out.stdout.decode().split("\0") if f]
    if files:
      return files
  except (OSError, subprocess.CalledProcessError):
    pass
  files = []
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
    files += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
  return files


def doc_files():
  docs = os.path.join(ROOT, "docs")
  return [README] + sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
  text = open(path, encoding="utf-8").read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # a '#' in a code block is no heading
  return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_no_reference_outside_the_repository():
  hits = []
  for rel in tracked_files():
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):
      continue  # deleted in the work tree, not yet in git's index
    with open(path, "rb") as f:
      data = f.read()
    hits += [f"{rel}: {bad.decode()}" for bad in FORBIDDEN if bad in data]
  assert not hits, "references to files that a clone does not have:\n" + "\n".join(hits)


def test_readme_is_short():
  with open(README, encoding="utf-8") as f:
    n = len(f.read().splitlines())
  assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): " \
                                "move detail to docs/"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(doc):
  text = re.sub(r"```.*?```", "", open(doc, encoding="utf-8").read(), flags=re.S)
  broken = []
  for m in LINK.finditer(text):
    target = m.group(1) or m.group(2)
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if not os.path.exists(dest):
      broken.append(f"{target}: no such file")
    elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
      broken.append(f"{target}: no heading with that anchor")
  assert not broken, f"{os.path.relpath(doc, ROOT)}:\n" + "\n".join(broken)


def test_cited_method_sections_exist():
  """Every `docs/method.md §N` (or §N.M) cited in the repository names a heading there."""
  headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", open(METHOD, encoding="utf-8").read(),
                            flags=re.M))
  missing = []
  for rel in tracked_files():
    if not rel.endswith((".py", ".md", ".ipynb")) or not os.path.isfile(os.path.join(ROOT, rel)):
      continue
    text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    missing += [f"{rel}: §{n}" for n in SECTION_CITE.findall(text) if n not in headings]
  assert not missing, "sections cited but not in docs/method.md:\n" + "\n".join(missing)


def test_ci_test_command_block():
  """`.ci/run` runs the second line after the marker: the fenced command itself."""
  lines = open(README, encoding="utf-8").read().splitlines()
  assert "<!-- ci-test-command -->" in lines, "README.md lost its ci-test-command marker"
  i = lines.index("<!-- ci-test-command -->")
  assert lines[i + 1].startswith("```"), lines[i + 1]
  assert "pytest" in lines[i + 2] and "tests" in lines[i + 2], lines[i + 2]
  assert lines[i + 3] == "```", lines[i + 3]
