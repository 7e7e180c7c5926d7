"""User regexes inside a JSON schema compilation (internal to json_schema): a string's
`pattern`, rewritten to match the JSON encoding of the characters it allows, and a caller's
`whitespace` regex, checked and embedded as given.

Both are parsed by `regex_parse.parse` (the engine's dialect: a Python-`re` subset); a
whitespace regex may not start with `^` or end with `$` (`_anchor_refusal`).
"""

from __future__ import annotations

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_regex import (
    MAX_STRING_REPEAT,
    alt,
    cat,
    has_top_alt,
    json_char_class,
    rep,
)
from atom_stream.structured.regex_parse import parse

_SUPPORTED = ("supported: a Python-re subset without lookarounds, backreferences, named groups, "
              "inline flags or anchors other than a leading ^ / trailing $")


def _anchor_refusal(regex: str) -> str | None:
    """Why `regex` cannot be embedded as it is, or None: regex_parse reads a `^` at the very
    start and an unescaped `$` at the very end as nothing (the match is full anyway), which
    is wrong for a regex embedded between others (anchors elsewhere it refuses itself)."""
    if regex.startswith("^"):
        return "the anchor '^' is not supported here at position 0"
    backslashes = len(regex[:-1]) - len(regex[:-1].rstrip("\\"))
    if regex.endswith("$") and backslashes % 2 == 0:
        return f"the anchor '$' is not supported here at position {len(regex) - 1}"
    return None


def parse_regex(regex: str, what: str, anchors: bool):
    """regex_parse's AST of `regex`; GrammarError naming `what` (e.g. "pattern") if
    regex_parse refuses it or `_extra_refusal` gives a reason. `anchors`: a leading `^` and a
    trailing unescaped `$` are allowed (and mean nothing: the match is full anyway)."""
    why = None if anchors else _anchor_refusal(regex)
    if why is not None:
        raise GrammarError(f"{what}: regex {regex!r}: {why} ({_SUPPORTED})")
    try:
        return parse(regex)
    except GrammarError as e:
        raise GrammarError(f"{what}: {e} ({_SUPPORTED})") from None


def _emit(node) -> str | None:
    """The regex_parse AST as a regex over the JSON encoding (inside a string literal) of the
    characters the AST matches; a repeat maximum above MAX_STRING_REPEAT becomes unbounded, a
    minimum above it is refused."""
    kind = node[0]
    if kind == "set":
        return json_char_class(node[1])
    if kind == "cat":
        return cat(*(_emit(n) for n in node[1]))
    if kind == "alt":
        return alt([_emit(n) for n in node[1]])
    _, sub, lo, hi = node
    if lo > MAX_STRING_REPEAT:
        raise GrammarError(f"a repeat count {{{lo}}} above {MAX_STRING_REPEAT} is not "
                           f"supported in a pattern")
    if hi is not None and hi > MAX_STRING_REPEAT:
        hi = None
    return rep(_emit(sub), lo, hi)


def pattern_content(pattern) -> str | None:
    """The regex for a JSON string's content (between the quotes) whose decoded value fully
    matches `pattern` (a leading ^ and trailing unescaped $ are allowed); None if no string
    can match; GrammarError if `pattern` is not a string or outside the dialect."""
    if not isinstance(pattern, str):
        raise GrammarError(f"'pattern' must be a string, got {pattern!r}")
    return _emit(parse_regex(pattern, "pattern", anchors=True))


def check_dialect(regex: str, what: str) -> str:
    """`regex` (e.g. a caller's whitespace) if it is in the dialect without anchors, grouped
    when it has a top-level alternation; GrammarError otherwise."""
    if not isinstance(regex, str):
        raise GrammarError(f"{what} must be a string regex, got {type(regex).__name__}")
    parse_regex(regex, what, anchors=False)
    return f"(?:{regex})" if regex and has_top_alt(regex) else regex
