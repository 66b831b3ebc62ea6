"""Every figure the README and the results page quote comes from a committed
results file.

A block (a table, a paragraph or a list item: the lines up to the next blank
line, or the next item) is tied to its files by an HTML comment on the line before it:

* ``<!-- table: FILE -->``: the table is a verbatim copy of one in FILE (the
  markdown a benchmark wrote);
* ``<!-- figures: FILE[#key.path] ... -->``: each decimal figure (``1.51``)
  and count (``3/3``) of the block is one of FILE's numbers (of the JSON
  subtree ``key.path`` if given) at the precision shown;
* ``<!-- not figures -->``: a table of something else (the layout).

Every table of the checked pages must carry one of them.
"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = ("README.md", "docs/results.md")
MARKER = re.compile(r"<!--\s*(table|figures|not figures):?\s*(.*?)\s*-->")
# A decimal figure (a typographic minus, −, makes it negative) or a k/n
# count; not inside words, paths or versions.
FIGURE = re.compile(r"(?<![\w.\-/])(−?)(\d+\.\d+|\d+/\d+)(?![\w.\-/]*\d)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def blocks(text: str):
  """(line number, marker kind, marker argument, the block's lines) of every
  marked block, and (line number, None, None, lines) of unmarked tables."""
  lines = text.splitlines()
  i, pending = 0, None
  while i < len(lines):
    line = lines[i]
    found = MARKER.fullmatch(line.strip())
    if found:
      pending = (i + 1, found.group(1), found.group(2))
      i += 1
      continue
    if not line.strip():
      i += 1
      continue
    j = i + 1
    # A block ends at a blank line, a marker, or the next item of its list.
    while (j < len(lines) and lines[j].strip() and not MARKER.fullmatch(lines[j].strip())
           and not (line.startswith("- ") and lines[j].startswith("- "))):
      j += 1
    block = lines[i:j]
    if pending is not None:
      yield pending[0], pending[1], pending[2], block
    elif block[0].startswith("|"):
      yield i + 1, None, None, block
    pending, i = None, j
  assert pending is None, f"a marker at line {pending[0]} marks nothing"


def _strip_code(text: str) -> str:
  """Without inline code (commands, paths) and link targets."""
  text = re.sub(r"`[^`]*`", " ", text)
  return re.sub(r"\]\([^)]*\)", "]", text)


def _numbers(source: str) -> tuple[list[float], set[str]]:
  """The numbers of FILE[#key.path] and its k/n strings."""
  path, _, key = source.partition("#")
  text = (ROOT / path).read_text()
  if key:
    tree = json.loads(text)
    for part in key.split("."):
      tree = tree[int(part) if isinstance(tree, list) else part]
    text = json.dumps(tree)
  return [float(x) for x in NUMBER.findall(text)], set(re.findall(r"\d+/\d+", text))


def problems(page: str, text: str) -> list[str]:
  out = []
  for line, kind, argument, block in blocks(text):
    where = f"{page}:{line}"
    if kind is None:
      out.append(f"{where}: a table without a marker (table:, figures: or not figures)")
    elif kind == "table":
      source = (ROOT / argument).read_text().splitlines()
      n = len(block)
      if not any(source[k:k + n] == block for k in range(len(source) - n + 1)):
        out.append(f"{where}: the table is not a copy of one in {argument}")
    elif kind == "figures":
      numbers, counts = [], set()
      for source in argument.split():
        more, more_counts = _numbers(source)
        numbers += more
        counts |= more_counts
      for minus, figure in FIGURE.findall(_strip_code("\n".join(block))):
        if "/" in figure:
          ok = figure in counts
        else:
          decimals = len(figure.split(".")[1])
          value = -float(figure) if minus else float(figure)
          ok = any(abs(v - value) <= 0.5 * 10 ** -decimals + 1e-12 for v in numbers)
        if not ok:
          out.append(f"{where}: {minus}{figure} is not in {argument}")
  return out


@pytest.mark.parametrize("page", PAGES)
def test_every_figure_is_in_its_results_file(page):
  found = problems(page, (ROOT / page).read_text())
  assert not found, "\n".join(found)


def test_the_check_catches_a_changed_figure_and_an_unmarked_table(tmp_path):
  source = tmp_path / "r.json"
  source.write_text(json.dumps({"a": {"speedup": 1.5123, "reached": "3/3"},
                                "b": {"speedup": 2.25}}))
  page = ("<!-- figures: {f}#a -->\n| m | s | r |\n|---|---|---|\n| rais | 1.51 | 3/3 |\n\n"
          "| unmarked | table |\n|---|---|\n")
  ok = page.format(f=str(source))
  assert problems("page", ok) == ["page:6: a table without a marker (table:, "
                                  "figures: or not figures)"]
  # A changed figure; one from outside the subtree; a changed sign.
  for wrong in ("1.52", "2.25", "−1.51"):
    bad = ok.replace("1.51", wrong)
    assert problems("page", bad)[0] == f"page:1: {wrong} is not in {source}#a"
  assert "3/4 is not in" in problems("page", ok.replace("3/3", "3/4"))[0]
  copy = "<!-- table: {f} -->\n| m | s |\n"
  (tmp_path / "t.md").write_text("### t\n\n| m | s |\n|---|---|\n")
  assert problems("page", copy.format(f=tmp_path / "t.md")) == []
  assert "not a copy" in problems("page", "<!-- table: {f} -->\n| m | x |\n".format(
      f=tmp_path / "t.md"))[0]
