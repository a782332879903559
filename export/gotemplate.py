"""A renderer for the subset of Go's text/template that Ollama chat templates use, so a Modelfile's TEMPLATE can be
checked against the tokenizer's Jinja chat template without Ollama.

Supported: text; {{ pipeline }} output; {{- and -}} whitespace trimming; {{/* comments */}}; if / else if / else /
end; range (with optional `$i, $v :=`) / else / end; values .Field, .A.B, $.Field, $var, $var.Field, "strings"
(Go escapes), numbers, true/false, (parenthesised pipelines); functions eq, ne, lt, le, gt, ge, not, and, or, len,
slice, index, and Ollama's json (Go's json.Marshal: compact, <, > and & escaped; keys in the order the data holds
them, as a Go struct's fields are, so callers give maps' keys sorted as Go does).
Anything else is a TemplateError naming the position, rather than a silently different rendering."""

from __future__ import annotations

import ast
import re

from .gofuncs import FUNCS, and_or, path, truth

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|'
    r"(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|"
    r"(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>:=|[(),|=]))"
)


class TemplateError(ValueError):
    pass


# ---- lexing into text and actions ---------------------------------------------------------------------------------


def _split(src: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', body)] with Go's trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            parts.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            parts.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = src[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        parts.append(("text", text))
    return parts


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body) and body[pos:].strip():
        m = _TOKEN.match(body, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot read {body[pos:]!r} in {{{{ {body} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


# ---- parsing into a tree -------------------------------------------------------------------------------------------


class _Parser:
    """The text and actions of `_split` as a tree: ("text", s), ("out", tokens), ("if", [(cond or None, nodes)]),
    ("range", names, tokens, nodes, else-nodes)."""

    def __init__(self, parts: list[tuple[str, str]]):
        self.parts, self.pos = parts, 0

    def block(self, stops: tuple[str, ...]):
        """Nodes up to one of the actions `stops` (its text is returned with them), or to the end when none."""
        nodes = []
        while self.pos < len(self.parts):
            kind, val = self.parts[self.pos]
            if kind == "text":
                nodes.append(("text", val))
                self.pos += 1
                continue
            word = val.split(None, 1)[0] if val else ""
            if word in stops:
                return nodes, val
            self.pos += 1
            nodes.append(self.action(word, val))
        if stops:
            raise TemplateError(f"missing {{{{ end }}}} (expected one of {stops})")
        return nodes, None

    def action(self, word: str, val: str):
        if word == "if":
            return self.if_chain(val[2:].strip())
        if word == "range":
            return self.range_node(val[5:].strip())
        if word in ("end", "else"):
            raise TemplateError(f"unexpected {{{{ {val} }}}}")
        if word in ("with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{ {val} }}}}: '{word}' is outside the supported subset")
        return ("out", _tokens(val))

    def if_chain(self, cond: str):
        body, stop = self.block(("else", "end"))
        branches = [(_tokens(cond), body)]
        while stop is not None and stop != "end":
            self.pos += 1
            rest = stop[4:].strip()
            if rest.startswith("if "):
                body, stop = self.block(("else", "end"))
                branches.append((_tokens(rest[3:].strip()), body))
            else:
                body, stop = self.block(("end",))
                branches.append((None, body))
        self.pos += 1
        return ("if", branches)

    def range_node(self, spec: str):
        names = []
        m = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)$", spec)
        if m:
            names = [n for n in (m.group(1), m.group(2)) if n]
            spec = m.group(3)
        body, stop = self.block(("else", "end"))
        other = []
        if stop == "else":
            self.pos += 1
            other, stop = self.block(("end",))
        self.pos += 1
        return ("range", names, _tokens(spec), body, other)


def _parse(parts: list[tuple[str, str]]):
    return _Parser(parts).block(())[0]


# ---- evaluation ---------------------------------------------------------------------------------------------------


class _Eval:
    def __init__(self, root):
        self.root = root
        self.vars = [{"$": root}]

    def var(self, name: str):
        for scope in reversed(self.vars):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable {name}")

    def value(self, tok, dot):
        kind, v = tok
        if kind == "str":
            return ast.literal_eval(v)
        if kind == "raw":
            return v[1:-1]
        if kind == "num":
            return float(v) if "." in v else int(v)
        if kind == "field":
            return dot if v == "." else path(dot, v)
        if kind == "var":
            head, _, rest = v.partition(".")
            return path(self.var(head), rest)
        if kind == "ident" and v in ("true", "false"):
            return v == "true"
        if kind == "ident" and v == "nil":
            return None
        raise TemplateError(f"unexpected {v!r}")

    def pipeline(self, toks, dot):
        toks = list(toks)
        if toks and toks[0][0] == "var" and len(toks) > 1 and toks[1] == ("punct", "="):
            raise TemplateError("variable assignment with '=' is outside the supported subset")
        if len(toks) > 1 and toks[1] == ("punct", ":="):
            value = self.pipeline(toks[2:], dot)
            self.vars[-1][toks[0][1]] = value
            return None
        if "|" in [t[1] for t in toks if t[0] == "punct"]:
            raise TemplateError("pipes '|' are outside the supported subset")
        return self._args(toks, dot)

    def _args(self, toks, dot):
        items, i = [], 0
        while i < len(toks):
            kind, v = toks[i]
            if (kind, v) == ("punct", "("):
                depth, j = 1, i + 1
                while depth:
                    if j >= len(toks):
                        raise TemplateError("unbalanced parentheses")
                    depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "punct" else 0
                    j += 1
                items.append(("value", self._args(toks[i + 1 : j - 1], dot)))
                i = j
                continue
            items.append(
                ("fn", v) if kind == "ident" and v in (*FUNCS, "and", "or") else ("value", self.value(toks[i], dot))
            )
            i += 1
        if not items:
            raise TemplateError("empty action")
        if items[0][0] == "fn":
            name, args = items[0][1], [v for _, v in items[1:]]
            return and_or(name, args) if name in ("and", "or") else FUNCS[name](*args)
        if len(items) != 1:
            raise TemplateError(f"cannot call a non-function with arguments: {toks}")
        return items[0][1]

    def run(self, nodes, dot, out: list[str]):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                v = self.pipeline(node[1], dot)
                if v is not None and not (len(node[1]) > 1 and node[1][1] == ("punct", ":=")):
                    out.append(v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v))
            elif kind == "if":
                for cond, body in node[1]:
                    if cond is None or truth(self.pipeline(cond, dot)):
                        self.run(body, dot, out)
                        break
            elif kind == "range":
                _, names, spec, body, other = node
                seq = self.pipeline(spec, dot)
                items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
                if not items:
                    self.run(other, dot, out)
                for k, v in items:
                    self.vars.append(dict(zip(names, (v,) if len(names) == 1 else (k, v))))
                    self.run(body, v, out)
                    self.vars.pop()


def render(template: str, data: dict) -> str:
    """Render `template` with `data` as the dot (e.g. {"Messages": [{"Role": "user", "Content": "..."}]})."""
    tree = _parse(_split(template))
    out: list[str] = []
    _Eval(data).run(tree, data, out)
    return "".join(out)
