"""commit-msg hook: a commit's subject is one line of at most 72 characters; the detail goes in the body, after a
blank line. Run by pre-commit (.pre-commit-config.yaml) with the message file git passes.

    python tools/commit_subject.py .git/COMMIT_EDITMSG
"""

from __future__ import annotations

import sys
from pathlib import Path

LIMIT = 72


def problem(message: str) -> str | None:
    """What is wrong with the message's subject, or None. Lines git strips (comments) do not count."""
    lines = [line for line in message.splitlines() if not line.startswith("#")]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return "the commit message is empty"
    subject = lines[0]
    if len(subject) > LIMIT:
        return f"the subject is {len(subject)} characters, more than {LIMIT}: put the detail in the body"
    if len(lines) > 1 and lines[1].strip():
        return "the subject is more than one line: leave a blank line between the subject and the body"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    found = problem(Path(argv[0]).read_text(encoding="utf-8"))
    if found:
        print(f"{argv[0]}: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
