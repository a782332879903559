"""The one renderer of a model's own chat template (the Jinja source in a GGUF's `tokenizer.chat_template` or a
tokenizer's config), used by the export checks and by the server alike, so what parity checks is what is served.

It renders the way transformers does: a sandboxed, immutable environment with trim_blocks and lstrip_blocks, the
`raise_exception` and `strftime_now` globals and a `tojson` filter that keeps non-ASCII text as is. No prompt format
is ever hard-coded here."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template refused the conversation (raise_exception) or could not render it."""


def _raise(message: str):
    raise TemplateError(str(message))


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(
    source: str, messages: list[dict], special_tokens: dict[str, str], add_generation_prompt: bool = True
) -> str:
    """The prompt text for `messages` (dicts with role and content); special_tokens gives the template its
    bos_token, eos_token, ... variables."""
    try:
        template = compile_template(source)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:  # syntax errors, sandbox violations, undefined attribute access ...
        raise TemplateError(f"the model's chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise TemplateError(f"the model's chat template failed on these messages: {e}") from e
