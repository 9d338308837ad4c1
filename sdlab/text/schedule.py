"""AUTOMATIC1111's prompt editing, alternation and composable diffusion (`modules/prompt_parser.py`).

- `[from:to:when]`, `[to:when]`, `[from::when]`: the text changes after step `when` (a `when` with a
  "." is a fraction of the steps, else a step number); nested freely.
- `[a|b|c]`: the text cycles a, b, c, … step by step.
- `a AND b :1.2`: several prompts whose guidance adds up (Liu et al. 2022, A1111's composable diffusion).

A prompt becomes a schedule `[(last_step, text), …]`: the text at steps up to `last_step`, as A1111's
`get_learned_conditioning_prompt_schedules` computes it; the sampler picks the entry by its model-call
count (0, 1, …), as A1111's denoiser does. Brackets that form no such group stay in the text, where the
emphasis syntax (`(word:1.2)`, `[word]`) reads them. The grammar is A1111's:

    prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
    alternate: "[" prompt ("|" [prompt])+ "]"
    plain: /([^\\\\\\[\\]():|]|\\\\.)+/

with stray `[ ] ( ) :` allowed at the top level as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_AND = re.compile(r"\bAND\b")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")
MAX_NESTING = 100  # brackets within brackets (the parser recurses once per level)


class PromptError(ValueError):
    """A prompt sdlab cannot parse or honour; the message names the problem."""


@dataclass(frozen=True)
class Scheduled:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: list | None
    after: list
    when: str


@dataclass(frozen=True)
class Alternate:
    """`[a|b|…]`."""

    options: list[list]


def _prompt(s: str, i: int, depth: int = 0) -> tuple[list, int]:
    """Nodes of a nested prompt from position i up to the first character it cannot take."""
    nodes: list = []
    while i < len(s):
        if m := _PLAIN.match(s, i):
            nodes.append(m.group(0))
            i = m.end()
        elif s[i] in "[(":
            group = _group(s, i, depth)
            if group is None:
                break
            node, i = group
            nodes.append(node)
        else:
            break
    return nodes, i


def _group(s: str, i: int, depth: int) -> tuple[list | Scheduled | Alternate, int] | None:
    """The bracketed group starting at s[i] ("[" or "("), or None when none parses there."""
    if depth >= MAX_NESTING:
        raise PromptError(f"the prompt nests brackets more than {MAX_NESTING} deep (at character {i})")
    first, j = _prompt(s, i + 1, depth + 1)
    end = s[j] if j < len(s) else ""
    if s[i] == "(":
        if end == ")":
            return ["(", first, ")"], j + 1
        if end == ":":
            second, k = _prompt(s, j + 1, depth + 1)
            if k < len(s) and s[k] == ")":
                return ["(", first, ":", second, ")"], k + 1
        return None
    if end == "]":
        return ["[", first, "]"], j + 1
    if end == "|":
        options = [first]
        while j < len(s) and s[j] == "|":
            option, j = _prompt(s, j + 1, depth + 1)
            options.append(option)
        return (Alternate(options), j + 1) if j < len(s) and s[j] == "]" else None
    if end == ":":
        if m := _WHEN.match(s, j + 1):
            return Scheduled(None, first, m.group(1)), m.end()
        second, k = _prompt(s, j + 1, depth + 1)
        if k < len(s) and s[k] == ":" and (m := _WHEN.match(s, k + 1)):
            return Scheduled(first, second, m.group(1)), m.end()
    return None


def parse(prompt: str) -> list:
    """The prompt's nodes; stray brackets and colons at the top level are text."""
    nodes: list = []
    i = 0
    while i < len(prompt):
        part, j = _prompt(prompt, i)
        nodes += part
        if j < len(prompt):  # a character no group took: text
            nodes.append(prompt[j])
            j += 1
        i = j
    return nodes


def _steps_of(nodes: list, steps: int, found: set[int], base: int | None) -> None:
    """Collect the steps where the text may change; resolve each `when` to a step (A1111's rule)."""
    for node in nodes:
        if isinstance(node, Scheduled):
            found.add(_when(node.when, steps, base))
            for part in (node.before or [], node.after):
                _steps_of(part, steps, found, base)
        elif isinstance(node, Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps_of(option, steps, found, base)
        elif isinstance(node, list):
            _steps_of(node, steps, found, base)


def _when(text: str, steps: int, base: int | None) -> int:
    """A fraction of the steps when `text` has a ".", else a step number; at most `steps`. In a hires
    pass after a first pass of `base` steps, A1111 counts both from the end of the first pass."""
    v = float(text)
    if base is not None:
        v = v - 1.0 if "." in text else v - base
    when = v * steps if "." in text else v
    return int(min(max(when, -1.0), steps))  # clamped before int(): `[a:b:1e999]` is a float infinity


def _text_at(nodes: list, step: int, steps: int, base: int | None) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            branch = (node.before or []) if step <= _when(node.when, steps, base) else node.after
            out.append(_text_at(branch, step, steps, base))
        elif isinstance(node, Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps, base))
        else:
            out.append(_text_at(node, step, steps, base))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, first_pass: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), …] of a prompt over `steps` steps (A1111's prompt schedule); `first_pass`: the
    steps of the first pass when these are a hires fix's second pass (A1111's `hires_steps`)."""
    nodes = parse(prompt)
    found = {steps}
    _steps_of(nodes, steps, found, first_pass)
    return [(t, _text_at(nodes, t, steps, first_pass)) for t in sorted(s for s in found if s >= 1)]


def text_at_call(schedule: list[tuple[int, str]], call: int) -> str:
    """The text for the model call `call` (0, 1, …): the first entry with call <= its last step."""
    return next((text for last, text in schedule if call <= last), schedule[-1][1])


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`a AND b :1.2` -> [("a", 1.0), (" b", 1.2)] (A1111's composable-diffusion prompts): the weight is a
    number after the last colon, trailing whitespace dropped, as A1111's `re_weight` reads it (in linear
    time: that regex takes seconds on a prompt with a long run of spaces)."""
    parts = []
    for sub in _AND.split(prompt):
        head, colon, tail = sub.rpartition(":")
        if colon and _NUMBER.fullmatch(tail.strip()):
            parts.append((head.rstrip(), float(tail.strip())))
        else:
            parts.append((sub.rstrip(), 1.0))
    return parts
