"""Reading a compiled HLO module's text: its computations, what a computation
reaches, the top-level loops (tests of what the step compiles to)."""

import re


def computations(hlo: str) -> dict[str, str]:
  """name -> body text of every computation in an HLO module dump."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      name, lines = head.group(1), []
    elif line == "}" and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def reachable(comps: dict[str, str], root: str) -> set[str]:
  seen, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations|"
                       r"true_computation|false_computation)=\{?%([\w.\-]+)",
                       comps[c])
    todo += re.findall(r"branch_computations=\{([^}]*)\}", comps[c]) and [
        x.strip().lstrip("%") for x in
        ",".join(re.findall(r"branch_computations=\{([^}]*)\}", comps[c])).split(",")]
  return seen


def entry(hlo: str) -> str:
  """The name of the module's entry computation."""
  comps = computations(hlo)
  return next(n for n in comps if re.search(r"^ENTRY %?" + re.escape(n) + " ", hlo, re.M))


def loop_bodies(comps: dict[str, str], root: str) -> list[str]:
  """The body computations of the ``while`` loops in computation ``root``."""
  return re.findall(r"while\(.*?body=%([\w.\-]+)", comps[root])


def top_level_loops(hlo: str) -> list[str]:
  """The text of each loop of the entry computation, with everything it reaches."""
  comps = computations(hlo)
  return ["\n".join(comps[c] for c in reachable(comps, body))
          for body in loop_bodies(comps, entry(hlo))]
