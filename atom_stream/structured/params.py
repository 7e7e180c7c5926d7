"""vLLM's structured-output parameters and their compilation into Grammars.

`StructuredOutputsParams` is vLLM's class of the same name (`GuidedDecodingParams`, its older
name, is the same class here): exactly one constraint of
- `json`: a JSON Schema (dict or JSON text), compiled by json_schema.schema_to_regex;
- `regex`: a pattern in regex_parse's dialect (full match);
- `choice`: a list of strings, the output being exactly one of them;
- `json_object`: True, any JSON object or array (vLLM's response_format json_object);
- `grammar` (EBNF / Lark) and `structural_tag`: refused (GrammarError): there is no grammar
  engine here.
`disable_any_whitespace` keeps JSON compact (no whitespace between tokens);
`whitespace_pattern` (a regex) replaces the default `[ \\t\\n\\r]*` of JSON schemas. `backend`,
`disable_fallback` and `disable_additional_properties` are accepted and ignored (there is one
backend; objects with properties never take other keys).

`GrammarCompiler(tokenizer, vocab_size).compile(spec)` returns a cached Grammar (LRU, keyed by
the spec's content); the vocabulary's TokenIndex is built on first use. Compiles run on several
threads at once (AsyncEngine's executor): one TokenIndex is built, and concurrent compiles of
one spec wait for a single build and share its Grammar (and so its cached masks). A cached
Grammar whose DFA is `worn` (dfa.LazyDFA.worn: the json_object DFA, shared by every such
request, after many nestings) is replaced by a fresh build for the requests that follow.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import msgspec

from atom_stream.structured.dfa import JsonDFA, RegexDFA
from atom_stream.structured.errors import GrammarError
from atom_stream.structured.guide import Grammar, TokenIndex

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
MAX_CACHED_GRAMMARS = 32  # compiled specs kept per engine (LRU)


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but "
                             f"multiple are specified: {given}")
        if not given:
            raise ValueError("You must use one kind of structured outputs constraint but none "
                             "are specified")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> str:
        return json.dumps(msgspec.to_builtins(self), sort_keys=True)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


def coerce_structured(value: Any) -> StructuredOutputsParams | None:
    """A StructuredOutputsParams from the struct itself, a dict of its fields, or any object
    with its attributes (vLLM's own class); ValueError naming what is wrong."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if not isinstance(value, dict):
        fields = StructuredOutputsParams.__struct_fields__
        if not any(hasattr(value, f) for f in KINDS):
            raise ValueError(f"must be a StructuredOutputsParams or a dict, got "
                             f"{type(value).__name__}")
        value = {f: getattr(value, f) for f in fields if getattr(value, f, None) is not None}
    try:
        return msgspec.convert(value, StructuredOutputsParams)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from None


class GrammarCompiler:
    """Compiles specs for one tokenizer's vocabulary (thread-safe; see the module docstring)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._index: TokenIndex | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._building: dict[str, Future] = {}  # spec key -> the build in progress
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()  # held while the index is built (once)

    def index(self) -> TokenIndex:
        """The vocabulary's TokenIndex, built once (GrammarError: no byte-level tokenizer)."""
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    self._index = self._build_index()
        return self._index

    def _build_index(self) -> TokenIndex:
        table = None
        if self.tokenizer is not None and hasattr(self.tokenizer, "byte_table"):
            table = self.tokenizer.byte_table(True)
        if table is None:
            raise GrammarError("structured outputs need a byte-level tokenizer (its tokens' "
                               "bytes); this model's tokenizer has none")
        return TokenIndex(table, self.vocab_size, self.tokenizer.byte_table(False))

    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """The Grammar of `spec`: cached, or built once however many threads ask at a time
        (the others wait for it; a GrammarError reaches each of them)."""
        key = spec.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.dfa.worn:  # retired: new requests get a fresh DFA
                del self._cache[key]
            elif hit is not None:
                self._cache.move_to_end(key)
                return hit
            building = self._building.get(key)
            if building is None:
                mine = self._building[key] = Future()
        if building is not None:
            return building.result()
        try:
            grammar = Grammar(build_dfa(spec), self.index(), spec.kind)
        except BaseException as e:
            with self._lock:
                del self._building[key]
            mine.set_exception(e)
            raise
        with self._lock:
            del self._building[key]
            self._cache[key] = grammar
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        mine.set_result(grammar)
        return grammar


def build_dfa(spec: StructuredOutputsParams):
    """The DFA of a spec; GrammarError if it cannot be served."""
    kind = spec.kind
    if kind == "json_object":
        return JsonDFA(whitespace="none" if spec.disable_any_whitespace else "any")
    if kind == "regex":
        return RegexDFA(spec.regex)
    from atom_stream.structured import json_schema

    if kind == "choice":
        return RegexDFA(json_schema.choice_regex(spec.choice))
    if kind == "json":
        ws = ("" if spec.disable_any_whitespace
              else spec.whitespace_pattern or json_schema.WS_DEFAULT)
        return RegexDFA(json_schema.schema_to_regex(spec.json, whitespace=ws))
    raise GrammarError(f"structured outputs of kind {kind!r} are not supported (no grammar "
                       f"engine); use json, json_object, regex or choice")
