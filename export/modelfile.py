"""An Ollama Modelfile for an exported GGUF: FROM the file (relative to the Modelfile), Phi-3's chat format as a Go
TEMPLATE over .Messages, stop parameters for the turn markers, num_ctx, and an optional SYSTEM prompt.

Ollama puts the Modelfile's SYSTEM prompt (or the request's) into .Messages as a system message and always asks
for an assistant turn next, so the template renders what the tokenizer's chat template renders with
add_generation_prompt=True; `check_template` proves it on a chat, token for token."""

from __future__ import annotations

import os
from pathlib import Path

from . import gotemplate, prompts
from .files import ExportError, write_text

PHI3_TEMPLATE = """{{- range .Messages }}
{{- if eq .Role "system" }}{{ if .Content }}<|system|>
{{ .Content }}<|end|>
{{ end }}
{{- else if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""
STOPS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")
DEFAULT_NUM_CTX = 4096


def _quote(s: str) -> str:
    if '"""' in s:
        raise ExportError('a Modelfile value cannot contain """')
    return f'"""{s}"""'


def render_modelfile(from_path: str, num_ctx: int, system: str | None = None, name: str | None = None) -> str:
    lines = [f"# Ollama Modelfile{f' for {name}' if name else ''}, written by `python -m export modelfile`.",
             "# Phi-3 chat format; the soul is folded into the head, so nothing else is needed at run time.",
             f"FROM {from_path}", "", f"TEMPLATE {_quote(PHI3_TEMPLATE)}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in STOPS]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"


def to_ollama_messages(messages: list[dict]) -> list[dict]:
    return [{"Role": m["role"], "Content": m["content"]} for m in messages]


def check_template(template: str, tokenizer, messages=prompts.CHAT) -> dict:
    """Render `messages` with the Go template and with the tokenizer's chat template; compare text and tokens."""
    go_text = gotemplate.render(template, {"Messages": to_ollama_messages(messages)})
    hf_text = prompts.chat_text(tokenizer, messages)
    go_ids = prompts.encode(tokenizer, go_text, templated=True)
    hf_ids = prompts.encode(tokenizer, hf_text, templated=True)
    return {"ok": go_ids == hf_ids and go_text == hf_text, "text_equal": go_text == hf_text,
            "tokens": len(hf_ids), "go_text": go_text, "hf_text": hf_text}


def gguf_context(gguf_path: Path) -> int | None:
    """The original (short-factor) context of a GGUF, else its context length: a sensible num_ctx."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    for key in (f"{arch}.rope.scaling.original_context_length", f"{arch}.context_length"):
        f = reader.fields.get(key)
        if f is not None:
            return int(f.parts[-1][0])
    return None


def write(gguf_path: Path, out: Path, name: str | None = None, system: str | None = None,
          num_ctx: int | None = None, model_dir: Path | None = None, require_gguf: bool = True,
          log=print) -> Path:
    """Write the Modelfile at `out` (atomically). With `model_dir`, first check the template against that model's
    chat template and refuse to write one that renders differently."""
    gguf_path, out = Path(gguf_path), Path(out)
    if require_gguf and not gguf_path.is_file():
        raise ExportError(f"{gguf_path}: no such GGUF file")
    if num_ctx is None:
        num_ctx = (gguf_context(gguf_path) if gguf_path.is_file() else None) or DEFAULT_NUM_CTX
    if model_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.chat_template:
            result = check_template(PHI3_TEMPLATE, tok)
            if not result["ok"]:
                raise ExportError(f"the Modelfile template renders differently from {model_dir}'s chat template:\n"
                                  f"  Modelfile: {result['go_text']!r}\n  tokenizer: {result['hf_text']!r}")
            log(f"modelfile template renders the chat token-identically to the chat template "
                f"({result['tokens']} tokens)")
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(gguf_path.resolve(), out.parent.resolve())
    from_path = rel if rel.startswith("..") else f"./{rel}"
    write_text(out, render_modelfile(from_path, num_ctx, system, name))
    log(f"wrote {out} (FROM {from_path}, num_ctx {num_ctx})")
    return out


# ---- reading one back (for `ollama`) -------------------------------------------------------------------------------

def parse(text: str, where: str = "Modelfile") -> list[tuple[str, str]]:
    """[(COMMAND, argument)] with triple-quoted and quoted arguments unwrapped; comments and blank lines skipped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            if body.endswith('"""') and len(arg) >= 6:
                arg = body[:-3]
            else:
                parts = [body]
                while True:
                    if i >= len(lines):
                        raise ExportError(f"{where}: {cmd} starts a \"\"\" string that never ends")
                    nxt = lines[i]
                    i += 1
                    if nxt.rstrip().endswith('"""'):
                        parts.append(nxt.rstrip()[:-3])
                        break
                    parts.append(nxt)
                arg = "\n".join(parts)
        out.append((cmd.upper(), arg))
    return out
