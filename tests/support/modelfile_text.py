"""Reading a Modelfile back, for tests: [(COMMAND, argument)] with triple-quoted and quoted arguments unwrapped."""

from __future__ import annotations


def parse(text: str, where: str = "Modelfile") -> list[tuple[str, str]]:
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
                        raise ValueError(f'{where}: {cmd} starts a """ string that never ends')
                    nxt = lines[i]
                    i += 1
                    if nxt.rstrip().endswith('"""'):
                        parts.append(nxt.rstrip()[:-3])
                        break
                    parts.append(nxt)
                arg = "\n".join(parts)
        out.append((cmd.upper(), arg))
    return out
