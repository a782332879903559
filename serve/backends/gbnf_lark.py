"""GBNF (llama.cpp's grammar format, which serve.structured and serve.tools write) as the Lark grammar llguidance reads.

One pass over the text's tokens, no syntax tree: the two formats differ only in how rules, literals and character
classes are spelled. Rules become parser rules named r0, r1, ... (`root` becomes `start`), literals stay literals and
character classes become one-character regular expressions. It runs on the request thread holding the GIL, so it is
kept linear in the grammar's size: a grammar at serve.structured's byte limit converts in a fraction of a second.
"""

from __future__ import annotations

import re

TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[a-zA-Z0-9-]+)
  | (?P<literal>"(?:[^"\\]|\\.)*")
  | (?P<cls>\[\^?(?:[^\]\\]|\\.)*\])
  | (?P<any>\.)
  | (?P<count>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[()|*+?])
    """,
    re.VERBOSE | re.DOTALL,
)
ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}
HEX = {"x": 2, "u": 4, "U": 8}
DEEPEST = 8  # groups nested deeper than this become rules of their own
MOST_NESTED = 64  # groups nested deeper than this are refused: llguidance follows rules recursively (stack)


class GbnfError(ValueError):
    pass


def _chars(body: str, where: int) -> list[str]:
    """The characters a literal's or a class's body stands for, GBNF's escapes read."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1 : i + 2]
        if e in HEX:
            digits = body[i + 2 : i + 2 + HEX[e]]
            if len(digits) != HEX[e] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise GbnfError(f"a bad \\{e} escape at offset {where + i}")
            out.append(chr(int(digits, 16)))
            i += 2 + HEX[e]
        elif e in ESCAPES:
            out.append(ESCAPES[e])
            i += 2
        else:
            raise GbnfError(f"an unknown escape \\{e} at offset {where + i}")
    return out


def _rx(c: str) -> str:
    """One character for a regular expression's class: letters and digits as they are, anything else by its code
    (Rust's regex syntax refuses escapes such as \\< that other syntaxes allow)."""
    return c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}"


def _literal(body: str, where: int) -> str:
    text = "".join(_chars(body[1:-1], where))
    if not text:
        return '""'
    if all(0x20 <= ord(c) and c not in '"\\' for c in text):
        return f'"{text}"'
    return "/" + "".join(f"[{_rx(c)}]" for c in text) + "/"


def _class(body: str, where: int) -> str:
    neg = body.startswith("[^")
    chars = _chars(body[2 if neg else 1 : -1], where)
    parts, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            parts.append(f"{_rx(chars[i])}-{_rx(chars[i + 2])}")
            i += 3
        else:
            parts.append(_rx(chars[i]))
            i += 1
    return f"/[{'^' if neg else ''}{''.join(parts)}]/"


class _Reader:
    """The rules of a GBNF text, read token by token: rules[name] is its body as parts [the rule referred to or "",
    Lark text], refs[name] the rules it refers to."""

    def __init__(self):
        self.rules: dict[str, list[list[str]]] = {}
        self.refs: dict[str, set[str]] = {}
        self.body: list[list[str]] | None = None
        self.current = ""
        self.pending: str | None = None  # a name not yet known to start a rule or refer to one
        self.opens: list[int] = []  # where the open groups start in body, outermost first
        self.seen: dict[str, str] = {}  # literals and classes already written

    def read(self, gbnf: str) -> None:
        pos = 0
        for m in TOKEN.finditer(gbnf):
            if m.start() != pos:
                break
            pos = m.end()
            if m.lastgroup != "space":
                self.token(m.lastgroup, m.group(), m.start())
        if pos != len(gbnf):
            raise GbnfError(f"the grammar holds a character GBNF does not have at offset {pos}")
        self.refer()
        if self.opens:
            raise GbnfError("a ( without its )")

    def refer(self) -> None:
        """The pending name, now known to be a reference in the current rule."""
        if self.pending is not None:
            if self.body is None:
                raise GbnfError("the grammar does not start with a rule")
            self.body.append([self.pending, ""])
            self.refs[self.current].add(self.pending)
            self.pending = None

    def token(self, kind: str, text: str, at: int) -> None:
        if kind == "define":
            if self.pending is None or self.opens:
                raise GbnfError(f"::= without a rule name before it, or inside a group, at offset {at}")
            if self.pending in self.rules:
                raise GbnfError(f"the rule {self.pending} is defined twice (offset {at})")
            self.current, self.pending = self.pending, None
            self.body = self.rules[self.current] = []
            self.refs[self.current] = set()
            return
        self.refer()
        if kind == "name":
            self.pending = text
        elif self.body is None:
            raise GbnfError(f"the grammar does not start with a rule at offset {at}")
        elif kind in ("literal", "cls"):
            if text not in self.seen:
                self.seen[text] = _literal(text, at) if kind == "literal" else _class(text, at)
            self.body.append(["", self.seen[text]])
        elif kind == "any":
            self.body.append(["", "/(?s:.)/"])
        elif kind == "count" or text in "*+?":
            if not self.body:
                raise GbnfError(f"a repetition of nothing at offset {at}")
            self.body[-1][1] += text.replace(" ", "")
        elif text == "(":
            if len(self.opens) == MOST_NESTED:
                raise GbnfError(f"groups nested more than {MOST_NESTED} deep at offset {at}")
            self.opens.append(len(self.body))
            self.body.append(["", text])
        elif text == ")":
            self.close(at)
        else:
            self.body.append(["", text])

    def close(self, at: int) -> None:
        """A group ends. llguidance's Lark reader refuses groups nested about 25 deep: one nested deeper than DEEPEST
        becomes a rule of its own."""
        if not self.opens:
            raise GbnfError(f"a ) without its ( at offset {at}")
        start = self.opens.pop()
        if len(self.opens) < DEEPEST:
            self.body.append(["", ")"])
            return
        lifted = f"{self.current}({len(self.rules)})"  # no GBNF name has parentheses
        inner = self.body[start + 1 :]
        self.rules[lifted], self.refs[lifted] = inner, {r for r, _ in inner if r}
        del self.body[start:]
        self.body.append([lifted, ""])
        self.refs[self.current].add(lifted)


def to_lark(gbnf: str) -> str:
    """The Lark text for a GBNF grammar whose start rule is `root` (GbnfError where it cannot be read)."""
    reader = _Reader()
    reader.read(gbnf)
    rules, refs = reader.rules, reader.refs
    if "root" not in rules:
        raise GbnfError("the grammar has no root rule")
    if missing := sorted({r for used in refs.values() for r in used} - rules.keys()):
        raise GbnfError(f"the grammar uses rules it does not define: {', '.join(missing[:5])}")
    names = _names(refs)
    lines = [f"{names[name]}: " + " ".join(names[r] + t if r else t for r, t in parts) for name, parts in rules.items()]
    return "%llguidance {}\n\n" + "\n".join(lines) + "\n"


def _names(refs: dict[str, set[str]]) -> dict[str, str]:
    """Lark names: a rule that refers to nothing but terminals (and not to itself) is a terminal too (upper case,
    one lexeme for llguidance's lexer: a JSON string is then one lexeme, not one per character); the rest are
    parser rules; `root` is `start`."""
    terminal: set[str] = set()
    grown = True
    while grown:
        grown = False
        for name, used in refs.items():
            if name not in terminal and name != "root" and used <= terminal:
                terminal.add(name)
                grown = True
    return {
        name: "start" if name == "root" else (f"T{i}" if name in terminal else f"r{i}") for i, name in enumerate(refs)
    }
