"""Print the requirements of pyproject.toml's dependencies plus the named extras, one a line, for `pip install -r`.

    python requirements.py pyproject.toml train [export ...]

The extras' references to the project itself (aegis-soul[train]) are followed, so the images install the same set
`pip install .[EXTRA]` would, in a layer that does not change when the source does. The Dockerfile installs them with
`-c requirements.lock`, at the releases CI tests.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    name = re.sub(r"[-_.]+", "-", project["name"]).lower()
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no extra {extra!r} (extras: {', '.join(sorted(optional))})")
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*\[([^\]]+)\]\s*", req)
            if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() == name:
                todo += [e.strip() for e in m.group(2).split(",")]
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
