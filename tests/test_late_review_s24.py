"""Late review of session 24's changes (6d1e2cf..f123484).

- tool_parsers: a DeepSeek-V3 call whose end token is missing but whose closing fence was
  written (`{json}\\n```<｜tool▁call▁begin｜>...` or `...```<｜tool▁calls▁end｜>`) kept the fence
  as argument text (`{"a": 1}\\n````), streamed and whole: the fence is the start of the call's
  end marker (`\\`\\`\\`<｜tool▁call▁end｜>`), not JSON. A call cut short by the next call's begin
  or the section's end now drops a trailing partial end marker.
"""

from __future__ import annotations

import pytest
from test_tools_review_s24 import ALL_MARKERS, streamed

from atom_stream.server.tool_parsers import DEEPSEEK_V3, extract_tool_calls

D_SB, D_SE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
D_CB, D_SEP, D_CE = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
F = "```"


# the fence closed, the end token missing, the next call begins
NEXT_CALL = (f'{D_SB}{D_CB}function{D_SEP}f\n{F}json\n{{"a": 1}}\n{F}{D_CB}function{D_SEP}g\n'
             f'{F}json\n{{}}\n{F}{D_CE}{D_SE}ok')


@pytest.mark.parametrize("step", [1, 2, 3, 7, 10_000])
@pytest.mark.parametrize("text, want_content, want_calls", [
    (NEXT_CALL, "ok", [("f", '{"a": 1}'), ("g", "{}")]),
    # the fence closed, the end token missing, the section ends
    (f'{D_SB}{D_CB}function{D_SEP}f\n{F}json\n{{"a": 1}}\n{F}{D_SE}ok', "ok",
     [("f", '{"a": 1}')]),
])
def test_deepseek_unended_call_drops_its_closing_fence(text, want_content, want_calls, step):
    content, calls = extract_tool_calls(DEEPSEEK_V3, text)
    assert content == want_content
    assert [(c.function.name, c.function.arguments) for c in calls] == want_calls
    s_content, s_calls = streamed(DEEPSEEK_V3, text, step)
    assert s_content == want_content
    assert [tuple(c[1:]) for c in s_calls] == want_calls
    for _, _, args in s_calls:
        assert F not in args and not any(m in args for m in ALL_MARKERS), args
