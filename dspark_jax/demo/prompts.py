"""Built-in training prompts made from text on the machine, so a demo needs no downloaded data.

* `stdlib_code_prompts`: code prompts mined from the Python standard library's own sources.
* `chat_prompts`: chat-style prompts (some multi-turn) about the standard library's pydoc
  topics and its module / function docstrings.
* `synthetic_prompts`: short arithmetic / spelling prompts for the char-level tiny target.

Every function returns `read_rows`-style rows `[{"id", "turns": [user strings]}]` that depend
only on `seed` and the interpreter's standard library.
"""

from __future__ import annotations

import ast
import inspect
import os
import random
import re
import sysconfig
import textwrap
import warnings
from typing import Callable, Iterable, Iterator

# Directories of the standard library that are tests, demos, tooling or vendored code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                     "turtledemo", "ensurepip", "pydoc_data", "__pycache__", "encodings",
                     "__phello__", "venv", "msilib"}

_CODE_VARIANTS = (
    "Write a Python {kind} `{sig}` that does the following: {summary}",
    "Explain what this Python {kind} does:\n```python\n{source}\n```",
    "Complete this Python {kind}:\n```python\n{stub}\n```",
    "Implement the Python {kind} `{sig}` described by this docstring:\n\"\"\"\n{doc}\n\"\"\"",
    "Write unit tests with `unittest` for this {kind} from the `{module}` module:\n"
    "```python\n{source}\n```",
    "Review this Python code and suggest improvements:\n```python\n{source}\n```",
)


def _stdlib_files(root: str) -> list[str]:
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith("test")
                     and not x.startswith("config-"))
    files += [os.path.join(d, n) for n in sorted(names)
              if n.endswith(".py") and not n.startswith(("test_", "_"))]
  return sorted(files)


def _parse(path: str, root: str) -> tuple[str, str, ast.Module] | None:
  """(dotted module name, source, syntax tree) of a stdlib file; None if it does not parse."""
  try:
    with open(path, encoding="utf-8") as f:
      src = f.read()
    tree = ast.parse(src)
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return None
  module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
  module = module[:-len(".__init__")] if module.endswith(".__init__") else module
  return module, src, tree


def _first_sentence(doc: str) -> str:
  para = " ".join(doc.strip().split("\n\n")[0].split())
  m = re.match(r"(.+?[.!?])(\s|$)", para)
  return (m.group(1) if m else para).strip()


def _function_candidates(path: str, root: str, max_lines: int, max_chars: int) -> list[dict]:
  """Public documented top-level functions and methods of top-level classes of one file."""
  parsed = _parse(path, root)
  if parsed is None:
    return []
  module, src, tree = parsed
  lines = src.splitlines(keepends=True)
  found = []

  def visit(node, cls):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      return
    if node.name.startswith("_") or (cls and cls.startswith("_")):
      return  # private and dunder: little to say, often trivial
    doc = ast.get_docstring(node)
    if not doc or len(doc) < 20:
      return
    if node.end_lineno - node.lineno + 1 > max_lines:
      return
    # Whole lines, dedented (`ast.get_source_segment` re-splits the file on every call, which
    # is quadratic over a large module).
    source = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
    if len(source) > max_chars:
      return
    summary = _first_sentence(doc)
    if len(summary) < 12 or len(summary) > 300:
      return
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    header = f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"
    doc_lines = inspect.cleandoc(doc)
    stub = f"{header}\n" + textwrap.indent(f'"""{doc_lines}\n"""', "    ")
    qual = f"{cls}.{node.name}" if cls else node.name
    found.append(dict(module=module, qualname=qual, kind="method" if cls else "function",
                      sig=f"{qual}({ast.unparse(node.args)})", summary=summary, doc=doc_lines,
                      source=source.rstrip(), stub=stub))

  for node in tree.body:
    if isinstance(node, ast.ClassDef):
      for sub in node.body:
        visit(sub, node.name)
    else:
      visit(node, None)
  return found


def _fill(n: int, rng: random.Random, groups: Iterable[list[dict]], num_variants: int,
          render: Callable[[dict, int], tuple[str, ...]],
          per_group: int) -> list[tuple[str, ...]]:
  """Up to `n` distinct prompts (tuples of user turns) from candidates met group by group.

  Pass 1 takes the groups lazily (a small n touches a few), shuffles each and renders up to
  `per_group` of its candidates (for variety), each with a variant it has not used yet. If that
  gives fewer than `n`, the candidates not used yet follow, then further unused variants of
  every candidate. Identical prompts are dropped.
  """
  prompts: list[tuple[str, ...]] = []
  seen: set[tuple[str, ...]] = set()
  visited: list[dict] = []  # every candidate met, in visiting order

  def add(c) -> bool:
    """One more prompt from `c` with a variant not yet used for it; True when n are made."""
    unused = [v for v in range(num_variants) if v not in c.setdefault("used", set())]
    if not unused:
      return False
    v = rng.choice(unused)
    c["used"].add(v)
    turns = render(c, v)
    if turns not in seen:
      seen.add(turns)
      prompts.append(turns)
    return len(prompts) >= n

  done = False
  for cands in groups:
    rng.shuffle(cands)
    visited += cands
    if any(add(c) for c in cands[:per_group]):
      done = True
      break
  rounds = [[c for c in visited if not c.get("used")]] + [visited] * num_variants
  for todo in ([] if done else rounds):
    if any(add(c) for c in todo):
      break
  return prompts


def synthetic_prompts(n: int, seed: int = 0) -> list[dict]:
  """`n` short deterministic prompts (arithmetic, counting, spelling) for tiny smoke runs.

  Char-level tiny tokenizers make real prompts hundreds of tokens long; these stay < 40 chars.
  """
  rng = random.Random(seed)
  words = ["cat", "tree", "river", "jax", "prime", "cloud", "seven", "apple", "block", "draft"]
  out = []
  for i in range(n):
    kind = i % 4
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    w = rng.choice(words)
    if kind == 0:
      text = f"What is {a} + {b}?"
    elif kind == 1:
      text = f"Count from {a % 10} to {a % 10 + 5}."
    elif kind == 2:
      text = f"Spell {w} backwards."
    else:
      text = f"Is {a} larger than {b}?"
    out.append({"id": f"synthetic-{seed}-{i}", "turns": [text]})
  return out


def stdlib_code_prompts(n: int, seed: int = 0, *, max_per_file: int = 3, max_lines: int = 40,
                        max_chars: int = 1600) -> list[dict]:
  """Code prompts mined from the Python standard library's own sources (no download needed).

  Recipe: list the `.py` files under `sysconfig.get_paths()["stdlib"]` (sorted; skipping
  tests, demos, idlelib/lib2to3, encodings, site-packages and private modules), shuffle them
  with `random.Random(seed)`, parse each with `ast` and keep public (no leading underscore),
  documented (docstring >= 20 chars) top-level functions and methods of top-level classes whose
  source is at most `max_lines` lines / `max_chars` characters. Up to `max_per_file` functions
  per file (for variety), each turned into one prompt from a randomly chosen template:
  "Write a Python function `name(args)` that does the following: <first docstring
  sentence>", "Explain what this Python function does: <source>", "Complete this Python
  function: <signature + docstring>", "Implement ... described by this docstring",
  "Write unit tests ...", "Review this Python code ...". Identical prompts are dropped. If the
  first pass yields fewer than `n`, the remaining functions follow, then further (unused)
  templates of every function: about 3k distinct functions, up to ~17k prompts.

  The result depends only on `seed` and the interpreter's standard library.

  Args:
    n: number of prompts wanted (fewer are returned, with a warning, if the stdlib runs out).
    seed: shuffling / template seed.
    max_per_file, max_lines, max_chars: limits described above.

  Returns:
    `[{"id": "stdlib-<seed>-<i>", "turns": [prompt]}]`.
  """
  if n <= 0:
    return []
  root = sysconfig.get_paths()["stdlib"]
  rng = random.Random(seed)
  files = _stdlib_files(root)
  rng.shuffle(files)
  groups = (_function_candidates(path, root, max_lines, max_chars) for path in files)
  prompts = _fill(n, rng, groups, len(_CODE_VARIANTS),
                  lambda c, v: (_CODE_VARIANTS[v].format(**c),), max_per_file)
  if len(prompts) < n:
    warnings.warn(f"the standard library gave only {len(prompts)} code prompts (asked for {n})")
  return [{"id": f"stdlib-{seed}-{i}", "turns": list(p)} for i, p in enumerate(prompts)]


# ---------------------------------------------------------------------------------------------
# Chat prompts about the standard library's documentation
# ---------------------------------------------------------------------------------------------
# First turns; `{title}` names the passage ("the "with" statement", "the `json` module").
_CHAT_VARIANTS = (
    "Explain this in simple terms:\n\n{text}",
    "Summarise the following documentation of {title}:\n\n{text}",
    "Rewrite this explanation of {title} for a beginner who has just started learning "
    "Python:\n\n{text}",
    "Give a short Python example that shows {title} in use, based on this description:"
    "\n\n{text}",
    "List the key points of this text about {title}:\n\n{text}",
    "{text}\n\nI found this in the Python documentation. What does it mean in practice?",
    "In a few sentences, what is {title} in Python and when would I use it?",
    # The other passage is from the same topic or file: related, so worth comparing.
    "Compare {title} with {other_title}, based on their descriptions.\n\n"
    "{title}:\n{text}\n\n{other_title}:\n{other_text}",
)
_COMPARE = len(_CHAT_VARIANTS) - 1
_FOLLOW_UPS = (
    "Can you give an example?",
    "Summarise that in one sentence.",
    "What mistakes do people often make with this?",
    "Explain it again for someone who has never programmed.",
    "Can you list the key points?",
    "When should I not use this?",
)
_MIN_PASSAGE_CHARS = 200  # shorter docstrings / sections have too little to talk about


def _sentence_case(title: str) -> str:
  """'The Ellipsis Object' -> 'the ellipsis object'; 'OR Patterns (Names)' -> 'OR patterns (names)'.

  pydoc titles are capitalised headings; the prompts use them mid-sentence.
  """
  return " ".join(w.lower() if re.fullmatch(r"\(?[A-Z][a-z]+\)?", w) else w
                  for w in title.split())


def _siblings(cands: list[dict]) -> list[dict]:
  """Links every candidate to its group (the passages a compare prompt may pair it with)."""
  for c in cands:
    c["group"] = cands
  return cands


def _clip(text: str, limit: int) -> str:
  """`text` cut to at most `limit` chars, at a paragraph, sentence or word end where possible."""
  text = text.strip()
  if len(text) <= limit:
    return text
  head = text[:limit]
  for sep in ("\n\n", ". ", "\n", " "):
    at = head.rfind(sep)
    if at >= limit // 2:
      return head[:at + (1 if sep == ". " else 0)].rstrip()
  return head.rstrip()


def _topic_groups() -> list[list[dict]]:
  """One group per pydoc topic (`pydoc_data.topics`): its sections as candidate passages.

  A topic's text opens with its title underlined by `*`; sections are titled lines underlined
  by `=` / `-` / `~`.
  """
  try:
    from pydoc_data.topics import topics
  except ImportError:  # stripped-down interpreters ship without pydoc_data
    return []
  groups = []
  for key in sorted(topics):
    lines = topics[key].splitlines()
    sections, title, body = [], None, []
    i = 0
    while i < len(lines):
      under = lines[i + 1] if i + 1 < len(lines) else ""
      if (lines[i].strip() and len(under) == len(lines[i]) and len(set(under)) == 1
          and under[0] in "*=-~"):
        sections.append((title, body))
        title, body = lines[i].strip(), []
        i += 2
        continue
      body.append(lines[i])
      i += 1
    sections.append((title, body))
    top = sections[1][0] if len(sections) > 1 else key
    cands = []
    for sec_title, sec_body in sections:
      text = "\n".join(sec_body).strip()
      if sec_title and len(text) >= _MIN_PASSAGE_CHARS:
        name = sec_title if sec_title == top else f"{sec_title} ({top})"
        cands.append({"title": _sentence_case(name), "text": text})
    if cands:
      groups.append(_siblings(cands))
  return groups


def _docstring_candidates(path: str, root: str) -> list[dict]:
  """The module docstring and public top-level function / class docstrings of one file."""
  parsed = _parse(path, root)
  if parsed is None:
    return []
  module, _, tree = parsed
  found = []
  doc = ast.get_docstring(tree)
  if doc and len(doc) >= _MIN_PASSAGE_CHARS:
    found.append({"title": f"the `{module}` module", "text": inspect.cleandoc(doc)})
  for node in tree.body:
    if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and not node.name.startswith("_")):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= _MIN_PASSAGE_CHARS:
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        found.append({"title": f"the `{module}.{node.name}` {kind}",
                      "text": inspect.cleandoc(doc)})
  return _siblings(found)


def _alternate(a: Iterable, b: Iterable) -> Iterator:
  """a0, b0, a1, b1, ...; the longer one's rest at the end."""
  a, b = iter(a), iter(b)
  for x in a:
    yield x
    for y in b:
      yield y
      break
  yield from b


def chat_prompts(n: int, seed: int = 0, *, max_chars: int = 1500,
                 max_per_group: int = 2) -> list[dict]:
  """Chat-style prompts about text on the machine: pydoc topics and stdlib docstrings.

  Passages are the sections of the pydoc topics (`pydoc_data.topics`: the language
  reference's statements, operators, types, ...) and the module / public function / class
  docstrings of the standard library's sources (files as in `stdlib_code_prompts`, read with
  `ast`, nothing imported), at least 200 chars each. Topics and files are shuffled with
  `random.Random(seed)` and taken alternately, up to `max_per_group` passages per topic or file
  in a first pass. Each passage makes one prompt from an instruction not yet used for it:
  explain, summarise, rewrite for a beginner, give an example, list key points, "what does it
  mean in practice", a text-free "what is X and when would I use it", or compare with another
  passage of the same topic or file. About a third of the prompts get one follow-up user
  turn and about one in six two ("Can you give an example?", "Summarise that in one
  sentence.", ...). Passages are cut (at a paragraph / sentence end) so that every turn is at
  most `max_chars` chars. Then the remaining passages and further instructions follow, as in
  `stdlib_code_prompts`.

  Args:
    n: number of prompts wanted (fewer are returned, with a warning, if the text runs out).
    seed: shuffling / instruction seed; the result depends only on it and the interpreter.
    max_chars: limit on the length of every user turn.
    max_per_group: passages per topic or file in the first pass.

  Returns:
    `[{"id": "chat-<seed>-<i>", "turns": [1 to 3 user turns]}]`.
  """
  if n <= 0:
    return []
  root = sysconfig.get_paths()["stdlib"]
  rng = random.Random(seed)
  topic_groups = _topic_groups()
  rng.shuffle(topic_groups)
  files = _stdlib_files(root)
  rng.shuffle(files)
  groups = _alternate(topic_groups, (_docstring_candidates(path, root) for path in files))

  def render(c: dict, v: int) -> tuple[str, ...]:
    other = rng.choice(c["group"])
    if v == _COMPARE and other is c:
      v = 0  # a lone passage (or the draw hit itself): explain instead
    template = _CHAT_VARIANTS[v]
    fields = dict(title=c["title"], other_title=other["title"], text="", other_text="")
    room = max_chars - len(template.format(**fields))
    if v == _COMPARE:
      fields.update(text=_clip(c["text"], room // 2), other_text=_clip(other["text"], room // 2))
    else:
      fields.update(text=_clip(c["text"], room))
    r = rng.random()
    follow = rng.sample(_FOLLOW_UPS, 2 if r < 1 / 6 else 1 if r < 1 / 2 else 0)
    return (template.format(**fields), *follow)

  prompts = _fill(n, rng, groups, len(_CHAT_VARIANTS), render, max_per_group)
  if len(prompts) < n:
    warnings.warn(f"the standard library gave only {len(prompts)} chat prompts (asked for {n})")
  return [{"id": f"chat-{seed}-{i}", "turns": list(p)} for i, p in enumerate(prompts)]
