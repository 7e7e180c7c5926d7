"""Chat templates: resolving `--chat-template`, rendering HF-style jinja templates as vLLM does,
and transformers' continue_final_message tagging.

- `resolve_chat_template(text_or_path)`: the template text, checked to parse (ValueError otherwise).
- `render_jinja(template, messages, add_generation_prompt, variables, kwargs)`: the prompt text, the
  messages as vLLM hands them to a template (`template_messages`: tool-call arguments as objects,
  rendered again with text arguments when the template can only concatenate text).
- `tag_final_message` / `cut_at_continue_tag`: continue_final_message's two halves.
- `checkpoint_chat_template(dir)`: a checkpoint's own template (chat_template.jinja, else
  tokenizer_config.json's `chat_template`), None when it has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]

CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' continue_final_message_tag


def tag_final_message(messages: list[Message]) -> tuple[list[Message], str]:
    """transformers' (5.x) continue_final_message, first half: a copy of `messages` whose last
    message has CONTINUE_TAG appended to its content (to its last text part for list content),
    and that content's text. The prompt is rendered from the copy and cut at the tag
    (`cut_at_continue_tag`), so it ends exactly where the template put the final content,
    whatever else the template writes after it (`<|im_end|>` holds "end", "im", "|>" ...)."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    last = dict(messages[-1])
    final = last.get("content")
    if final is None:
        raise ValueError('continue_final_message is set but the final message has no "content" '
                         "to continue!")
    if isinstance(final, (list, tuple)):
        parts = [dict(p) if isinstance(p, dict) else p for p in final]
        for part in reversed(parts):
            if isinstance(part, dict) and "text" in part:
                text = part["text"]
                part["text"] = f"{text}{CONTINUE_TAG}"
                break
        else:
            raise ValueError("continue_final_message is set but we could not find any text to "
                             "continue in the final message!")
        last["content"] = parts
    elif isinstance(final, str):
        text = final
        last["content"] = final + CONTINUE_TAG
    else:
        raise ValueError("continue_final_message is set but the final message's content is "  # noqa: TRY004
                         f"a {type(final).__name__}, not text")
    return [*messages[:-1], last], str(text)


def cut_at_continue_tag(rendered: str, final_text: str) -> str:
    """The second half: `rendered` cut right before the tag (and the trailing spacing the
    template trimmed off the tag, if it did)."""
    tag = CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the final message does not appear "
                         "in the chat after applying the chat template!")
    loc = rendered.rindex(tag)
    if rendered[loc:loc + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:loc]
    return rendered[:loc].rstrip()  # the template trimmed trailing spacing


def resolve_chat_template(chat_template: str | None) -> str | None:
    """A file path -> its contents; a literal jinja string -> itself. Either must parse as
    jinja (a ValueError naming the error otherwise): a broken --chat-template fails the start,
    not every chat request after it."""
    if chat_template is None:
        return None
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            text = f.read()
    elif "{" not in chat_template:
        raise ValueError(f"chat_template {chat_template!r} is neither a file nor a jinja template")
    else:
        text = chat_template
    import jinja2
    try:
        _compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid jinja template ({e})") from None
    return text


def _compile_template(text: str) -> None:
    """Compile `text` in the environment that renders it (transformers' sandbox, with its
    `{% break %}` / `{% continue %}` and `{% generation %}` tags; a plain jinja2 Environment
    refuses templates that render fine). TemplateSyntaxError when it does not parse."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: jinja's parser with the loop controls
        import jinja2
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
        return
    _compile_jinja_template(text)


def template_messages(messages: list[Message], objects: bool = True) -> list[Message]:
    """`messages` as vLLM hands them to a jinja chat template (`_postprocess_messages`), copied
    where changed: an assistant message's empty `tool_calls` list is dropped, and (`objects`)
    each call's `function.arguments` that is JSON text of an object becomes that object (null /
    empty ones `{}`), so `arguments | tojson` writes the object rather than a quoted string.
    Arguments that are an object already, or text that is not a JSON object, stay as given
    (vLLM coerces such text to `{}`)."""
    out = []
    for m in messages:
        assistant = isinstance(m, dict) and m.get("role") == "assistant"
        calls = m.get("tool_calls") if assistant else None
        if not isinstance(calls, list):
            out.append(m)
        elif not calls:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
        elif objects:
            out.append({**m, "tool_calls": [_object_arguments(c) for c in calls]})
        else:
            out.append(m)
    return out


def _object_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return call
    args = fn.get("arguments")
    if args is None or args == "":
        obj: Any = {}
    elif isinstance(args, str):
        try:
            obj = json.loads(args)
        except ValueError:
            return call
        if not isinstance(obj, dict):
            return call
    else:
        return call
    return {**call, "function": {**fn, "arguments": obj}}


def render_template_messages(render: Callable[[list[Message]], str],
                             messages: list[Message]) -> str:
    """`render(template_messages(messages))`, as vLLM renders. A template that can only take
    text arguments fails on the objects with a TypeError (DeepSeek-V3's own template joins
    `'```json\\n' + arguments`, which fails under vLLM too): it is rendered again with the
    arguments as given, so a tool-call history still renders with it."""
    converted = template_messages(messages)
    try:
        return render(converted)
    except TypeError:
        texts = template_messages(messages, objects=False)
        if converted == texts:
            raise
        return render(texts)


def render_jinja(template: str, messages: list[Message], add_generation_prompt: bool,
                 variables: dict[str, Any], kwargs: dict[str, Any]) -> str:
    """Render a HF-style chat template (transformers' sandboxed jinja environment), tool-call
    arguments as vLLM passes them (`render_template_messages`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(msgs: list[Message]) -> str:
        rendered, _ = render_jinja_template(conversations=[msgs], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            **{**variables, **kwargs})
        return rendered[0]
    return render_template_messages(render, messages)


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_chat_template(path: str) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tpl = read_json(os.path.join(path, "tokenizer_config.json")).get("chat_template")
    return tpl if isinstance(tpl, str) else None
