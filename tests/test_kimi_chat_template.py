"""The native Kimi chat format against the reference, byte for byte (expected strings written by
hand from the reference code; each cites where it comes from):
- TS: K2.5's tool_declaration_ts.py, as copied in thinking-machines-lab/tinker-cookbook
  `tinker_cookbook/renderers/kimi_k2_5_tool_declaration_ts.py` (tinker-cookbook 0.6.1 lines);
- TOK: K2.5's tokenization_kimi.py `TikTokenTokenizer.apply_chat_template` (deep_sort_dict of
  the tools, then `tools_ts_str = encode_tools_to_typescript_style(tools)`, JSON if it raises);
- JINJA: the Kimi chat_template.jinja (moonshotai/Kimi-K2-Thinking's, as vendored in
  ggml-org/llama.cpp `models/templates/moonshotai-Kimi-K2-Thinking.jinja`; K2.5 adds the
  `tools_ts_str` branch and the `thinking is defined and thinking is false` switches);
- K2 / K25: tinker-cookbook `renderers/kimi_k2.py` / `kimi_k25.py` (0.6.1 lines);
- HF: transformers 5.x `render_jinja_template` (continue_final_message tag, reasoning aliases).
"""

from __future__ import annotations

import json
import os

import pytest
from tokenizer_fixtures import write_kimi_tokenizer

from atom_stream.tokenizer import DemoTokenizer, load_tokenizer
from atom_stream.tokenizers_kimi import (
    DEFAULT_SYSTEM_PROMPT,
    KimiChatFormat,
    KimiTokenizer,
    deep_sort_dict,
    encode_tools_typescript,
    render_kimi_chat,
)

SYS = f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
AST = "<|im_assistant|>assistant<|im_middle|>"

# tinker-cookbook kimi_k25_test.py get_tool_spec(), in OpenAI form
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "Temperature unit"}},
        "required": ["location"]}}}
# TS L469-474 (header, namespace), L415-433 (description comment, type line), L139-175
# (required fields first, each sorted by name, ",\n" between, wrapped in {\n..\n}), L332-346
# (field: docstring lines then `name?: type`), L47-48 + L67-77 (`// ` comment per line),
# L237-238 (enum: "a" | "b")
WEATHER_TS = (
    "# Tools\n\n## functions\nnamespace functions {\n"
    "// Get the current weather for a location\n"
    "type get_weather = (_: {\n"
    "  // The city and state, e.g. San Francisco, CA\n"
    "  location: string,\n"
    "  // Temperature unit\n"
    '  unit?: "celsius" | "fahrenheit"\n'
    "}) => any;\n"
    "}\n")
# K2 L556-557 / JINJA `tools | tojson(separators=(',', ':'))` on TOK's deep-sorted tools
WEATHER_JSON = (
    '[{"function":{"description":"Get the current weather for a location","name":"get_weather",'
    '"parameters":{"properties":{"location":{"description":"The city and state, e.g. San '
    'Francisco, CA","type":"string"},"unit":{"description":"Temperature unit","enum":["celsius",'
    '"fahrenheit"],"type":"string"}},"required":["location"],"type":"object"}},'
    '"type":"function"}]')

SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search.\nTwo lines",
    "parameters": {
        "type": "object",
        "$defs": {"Filter": {"type": "object", "description": "A filter",
                             "properties": {"value": {"type": ["string", "number", "null"]},
                                            "field": {"type": "string"}},
                             "required": ["field"]}},
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 200,
                      "description": "Query text"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
            "tags": {"type": "array", "items": {"type": "string", "description": "a tag"},
                     "maxItems": 5},
            "filters": {"type": "array", "items": {"$ref": "#/$defs/Filter"}},
            "mode": {"anyOf": [{"type": "string", "enum": ["fast", "exact"]}, {"type": "null"}],
                     "default": "fast"},
            "options": {"type": "object", "properties": {"verbose": {"type": "boolean"}},
                        "additionalProperties": {"type": "integer"}}},
        "required": ["query"]}}}
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"},
                                     "children": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["name"]}}}


@pytest.fixture(scope="module")
def k25(tmp_path_factory) -> KimiTokenizer:
    """A K2.5-like checkpoint: the fixture vocabulary plus config.json model_type kimi_k25."""
    path = write_kimi_tokenizer(str(tmp_path_factory.mktemp("k25")))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "kimi_k25"}, f)
    tok = load_tokenizer(path)
    assert isinstance(tok, KimiTokenizer)
    assert tok.chat_format == KimiChatFormat(True, True, True)
    return tok


# ------------------------------------------------------------------ K2.5 TypeScript tools
def test_k25_tool_declare_turn_is_typescript(k25):
    # K25 L127-153: the TS string is the tool_declare turn, before the (default) system turn;
    # K25 L97-114: the generation prompt ends in <think>
    msgs = [{"role": "user", "content": "What's the weather in NYC?"}]
    assert k25.apply_chat_template(msgs, tools=[WEATHER]) == (
        f"<|im_system|>tool_declare<|im_middle|>{WEATHER_TS}<|im_end|>" + SYS
        + "<|im_user|>user<|im_middle|>What's the weather in NYC?<|im_end|>" + GEN + "<think>")


def test_typescript_encoder_schema_features():
    ts = encode_tools_typescript(deep_sort_dict([SEARCH, TREE]))  # TOK: deep-sorted first
    assert ts == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        # L403-413: each $defs entry is an `interface`, its description a comment above it;
        # L256-274: a type list is a union ("integer" would be "number")
        "// A filter\ninterface Filter {\n  field: string,\n"
        "  value?: string | number | null\n}\n"
        # L423-433: a multi-line description is one `// ` line per line
        "// Search.\n// Two lines\n"
        "type search = (_: {\n"
        # L67-77: description, then the constraints sorted by key, one comment line
        "  // Query text\n  // maxLength: 200, minLength: 1\n  query: string,\n"
        # L177-201: an item without docstring stays inline; L277-294: a $ref is its name
        "  filters?: Array<Filter>,\n"
        # L94-98: integer -> number; L336-341: `// Default: ` repr() for numbers
        "  // maximum: 50, minimum: 1\n  // Default: 10\n  limit?: number,\n"
        # L336-341: json.dumps for strings; L241-253: anyOf joins with " | "
        '  // Default: "fast"\n  mode?: "fast" | "exact" | null,\n'
        # L150-175: additionalProperties as `[k: string]: T`, nested one indent deeper
        "  options?: {\n    verbose?: boolean,\n    [k: string]: number\n  },\n"
        # L187-199: an item with a docstring opens Array<\n ... \n>; L180-181: minItems/maxItems
        "  // maxItems: 5\n  tags?: Array<\n    // a tag\n    string\n  >\n"
        "}) => any;\n"
        # L394-401, L417-418: "#" refs make the parameters a named interface (fields in the
        # given, here deep-sorted, order, not required-first)
        "interface parameters {\n  children?: Array<parameters>,\n  name: string\n}\n"
        "type tree = (_: parameters) => any;\n"
        "}\n")


def test_k25_tools_fall_back_to_json(k25):
    # TOK: a schema the encoder rejects (TS L232-233: enum value not an integer) -> no
    # tools_ts_str -> JINJA's JSON branch; TS L450-466: no "function" tool -> "" -> JSON too
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "enum": ["x"]}}}}}
    msgs = [{"role": "system", "content": "s"}]
    assert k25.apply_chat_template(msgs, tools=[bad], add_generation_prompt=False) == (
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"f","parameters":'
        '{"properties":{"n":{"enum":["x"],"type":"integer"}},"type":"object"}},'
        '"type":"function"}]<|im_end|><|im_system|>system<|im_middle|>s<|im_end|>')
    plugin = {"type": "_plugin", "_plugin": {"name": "p"}}
    assert k25.apply_chat_template(msgs, tools=[plugin], add_generation_prompt=False) == (
        '<|im_system|>tool_declare<|im_middle|>[{"_plugin":{"name":"p"},"type":"_plugin"}]'
        "<|im_end|><|im_system|>system<|im_middle|>s<|im_end|>")


def test_k25_detected_from_tool_declaration_ts_file(tmp_path):
    path = write_kimi_tokenizer(str(tmp_path))
    assert load_tokenizer(path).chat_format.typescript_tools is False  # K2: JSON
    with open(os.path.join(path, "tool_declaration_ts.py"), "w") as f:
        f.write("# never imported\n")
    tok = load_tokenizer(path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER]).startswith(
        f"<|im_system|>tool_declare<|im_middle|>{WEATHER_TS}<|im_end|>{SYS}")


def test_k2_tools_are_deep_sorted_compact_json(tmp_path):
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path)))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER]) == (
        f"<|im_system|>tool_declare<|im_middle|>{WEATHER_JSON}<|im_end|>{SYS}"
        "<|im_user|>user<|im_middle|>x<|im_end|>" + GEN + "<think>")


def test_checkpoint_template_gets_kimi_tool_variables(tmp_path):
    # TOK: trust_remote_code renders the checkpoint jinja through Kimi's own apply_chat_template,
    # which hands the template deep-sorted `tools` and (K2.5) `tools_ts_str`
    tpl = "{{ tools_ts_str }}#{{ tools | tojson(separators=(',', ':')) }}"
    path = write_kimi_tokenizer(str(tmp_path / "k25"), chat_template=tpl)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "kimi_k25"}, f)
    tok = load_tokenizer(path, trust_remote_code=True)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER]) == (
        WEATHER_TS + "#" + WEATHER_JSON)
    path = write_kimi_tokenizer(str(tmp_path / "k2"), chat_template=tpl.split("#")[1])
    tok = load_tokenizer(path, trust_remote_code=True)  # K2: sorted tools only
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER]) == (
        WEATHER_JSON)


# ------------------------------------------------------------------ turns and reasoning
def multi_step_tool_conversation() -> list[dict]:
    """tinker-cookbook kimi_k25_test.py get_multi_step_tool_conversation_for_generation()."""
    def call(i, city):
        return {"id": f"functions.get_weather:{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": f'{{"location": "{city}"}}'}}
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Compare the weather in NYC and LA."},
        {"role": "assistant", "content": "", "reasoning_content": "Let me check NYC weather first.",
         "tool_calls": [call(0, "New York, NY")]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:0",
         "content": '{"temperature": 72, "condition": "sunny"}'},
        {"role": "assistant", "content": "", "reasoning_content": "Now let me check LA weather.",
         "tool_calls": [call(1, "Los Angeles, CA")]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:1",
         "content": '{"temperature": 85, "condition": "clear"}'},
    ]


def test_k25_multi_step_tool_conversation(k25):
    # JINJA: no assistant without tool calls -> every turn is in the suffix and keeps its
    # reasoning; K2 L235-247 (tool turn: <|im_system|>{name}, "## Return of {id}\n"),
    # L267-283 (tool call section); no newlines between turns
    def turns(r0: str, r1: str) -> str:
        return (
            "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
            "<|im_user|>user<|im_middle|>Compare the weather in NYC and LA.<|im_end|>"
            f"{AST}<think>{r0}</think><|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.get_weather:0<|tool_call_argument_begin|>"
            '{"location": "New York, NY"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
            '{"temperature": 72, "condition": "sunny"}<|im_end|>'
            f"{AST}<think>{r1}</think><|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.get_weather:1<|tool_call_argument_begin|>"
            '{"location": "Los Angeles, CA"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
            "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n"
            '{"temperature": 85, "condition": "clear"}<|im_end|>')
    decl = f"<|im_system|>tool_declare<|im_middle|>{WEATHER_TS}<|im_end|>"
    msgs = multi_step_tool_conversation()
    assert k25.apply_chat_template(msgs, tools=[WEATHER]) == (
        decl + turns("Let me check NYC weather first.", "Now let me check LA weather.")
        + GEN + "<think>")
    # K2.5 JINJA `thinking is defined and thinking is false`: the suffix drops its reasoning
    # and the prompt ends in <think></think> (K25 L161-190, the disable-thinking renderer)
    assert k25.apply_chat_template(msgs, tools=[WEATHER], thinking=False) == (
        decl + turns("", "") + GEN + "<think></think>")


def test_history_reasoning_is_emptied(k25):
    # JINJA hist_msgs = messages[:last non-tool-call assistant + 1] get <think></think>
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "The answer is 4.",
             "reasoning_content": "HISTORICAL"},
            {"role": "user", "content": "What is 3+3?"}]
    assert k25.apply_chat_template(msgs) == (
        SYS + "<|im_user|>user<|im_middle|>What is 2+2?<|im_end|>"
        f"{AST}<think></think>The answer is 4.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 3+3?<|im_end|>" + GEN + "<think>")


def test_default_system_goes_before_a_leading_tool_declare_message(k25):
    # JINJA: `messages|length == 0 or messages[0]['role'] != 'system'` -> the default system
    # turn is written before every message, a leading tool_declare one included (K2 L167-194,
    # tinker's own renderer, puts it after; the HF template does not)
    msgs = [{"role": "tool_declare", "content": "T"}, {"role": "user", "content": "q"}]
    assert k25.apply_chat_template(msgs, add_generation_prompt=False) == (
        SYS + "<|im_system|>tool_declare<|im_middle|>T<|im_end|>"
        "<|im_user|>user<|im_middle|>q<|im_end|>")
    assert k25.apply_chat_template([], add_generation_prompt=False) == SYS


@pytest.mark.parametrize("fields,shown", [
    ({"thinking": "T"}, "T"),
    ({"reasoning": "R"}, "R"),
    ({"reasoning_content": None, "reasoning": "R"}, "R"),
    ({"reasoning_content": "", "reasoning": "R"}, ""),  # the first one not None wins
    ({"thinking": "T", "reasoning": "R"}, "T"),
])
def test_reasoning_field_aliases(k25, fields, shown):
    # HF _alias_reasoning_fields: reasoning_content = first non-None of
    # (reasoning_content, thinking, reasoning)
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", **fields, "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert k25.apply_chat_template(msgs, add_generation_prompt=False) == (
        SYS + "<|im_user|>user<|im_middle|>q<|im_end|>"
        f"{AST}<think>{shown}</think>a<|tool_calls_section_begin|><|tool_call_begin|>c0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


def test_k2_thinking_and_k2_instruct_templates(tmp_path):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "f",
                                                              "arguments": {"a": 1}}}]}]
    call = ("<|tool_calls_section_begin|><|tool_call_begin|>c0<|tool_call_argument_begin|>"
            '{"a": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    # K2-Thinking's JINJA writes think tags but has no `thinking` switch: the generation
    # prompt ends at <|im_middle|> and thinking=False keeps the suffix reasoning
    k2t = load_tokenizer(write_kimi_tokenizer(str(tmp_path / "t"),
                                              chat_template="<think></think>{{ x }}"))
    assert k2t.chat_format == KimiChatFormat(True, False, False)
    for kw in ({}, {"thinking": False}):
        assert k2t.apply_chat_template(msgs, **kw) == (
            SYS + f"<|im_user|>user<|im_middle|>q<|im_end|>{AST}<think>r</think>{call}" + GEN)
    # a template without think tags (K2-Instruct): none, whatever the vocabulary names
    k2i = load_tokenizer(write_kimi_tokenizer(str(tmp_path / "i"), chat_template="{{ x }}"))
    assert k2i.chat_format == KimiChatFormat(False, False, False)
    assert k2i.apply_chat_template(msgs) == (
        SYS + f"<|im_user|>user<|im_middle|>q<|im_end|>{AST}{call}" + GEN)


def test_content_parts_and_names(k25):
    # JINJA render_content: text parts joined with nothing; set_roles: `name or role`
    msgs = [{"role": "system", "name": "ops", "content": [{"type": "text", "text": "a"},
                                                          {"text": "b"}]},
            {"role": "user", "name": "bob", "content": [{"type": "text", "text": "x"},
                                                        {"type": "text", "text": "y"}]}]
    assert k25.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_system|>ops<|im_middle|>ab<|im_end|><|im_user|>bob<|im_middle|>xy<|im_end|>")


# ------------------------------------------------------------------ continue_final_message
@pytest.mark.parametrize("content,tail", [
    ("end", "end"),  # also inside the <|im_end|> after it: cut at the content, not there
    ("The answer is ", "The answer is "),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "im_"}], "aim_"),
    ("", ""),  # the prompt ends where the content would start
])
def test_continue_final_message_cuts_where_the_content_ends(k25, content, tail):
    # HF render_jinja_template: the final content gets "CONTINUE_FINAL_MESSAGE_TAG " and the
    # prompt is cut at the tag (a search for the content itself finds "end" in <|im_end|>)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    assert k25.apply_chat_template(msgs, add_generation_prompt=False,
                                   continue_final_message=True) == (
        SYS + f"<|im_user|>user<|im_middle|>hi<|im_end|>{AST}<think></think>{tail}")


def test_continue_final_message_errors():
    tok = DemoTokenizer()
    for msgs in ([], [{"role": "assistant", "content": None}],
                 [{"role": "assistant", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError, match="continue_final_message"):
            tok.apply_chat_template(msgs, add_generation_prompt=False,
                                    continue_final_message=True)
    assert tok.apply_chat_template([{"role": "user", "content": "end"}],
                                   add_generation_prompt=False, continue_final_message=True) == (
        "<|im_user|>user<|im_middle|>end")


def test_demo_format_has_no_default_system_or_think_tags():
    assert render_kimi_chat([{"role": "assistant", "content": "a", "reasoning_content": "r"}],
                            default_system=None, think_tags=False) == (
        f"{AST}a<|im_end|>{GEN}")
