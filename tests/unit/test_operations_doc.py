"""docs/operations.md explains every label the gate logs, and no label the gate lost.

The labels are read from the source with Python's own parser (string constants, not
text that merely looks like one in a comment or docstring):
- every upper-case string constant in the modules that judge a connection (admission,
  the gate, the session, the relay, the SMTP core, the policy), less the SMTP words,
  DNS record types and states that are not labels;
- every constant named after its own value anywhere in the package (`ADMIN_BAN =
  "ADMIN_BAN"`), which is how ban labels outside those modules are written;
- `metrics.REASONS`, the series the gate exports, when it exists.
Each must have its row in the table "What every refusal means", and each row there must
be a label the code still has.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "appliance" / "portcullis"
DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TABLE_HEADING = "## What every refusal means"

LABEL = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
# The modules that judge a connection and label what they decide.
DECIDERS = ["admission.py", "gate.py", "session.py", "relay.py", "smtp/*.py", "policy/*.py"]
# Upper-case constants there that are not labels.
NOT_LABELS = {
    "AAAA", "PTR",  # DNS record types
    "BODY", "DATA", "EHLO", "EXPN", "FROM", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT",
    "RSET", "STARTTLS", "VRFY", "PIPELINING", "ENHANCEDSTATUSCODES", "XCLIENT", "XFORWARD",
    "ESMTP",  # SMTP words
    "BEGIN",  # SQL
    "NEEDS_REPLY", "NEED_DATA", "PAUSED",  # the SMTP core's sentinels
}


def constants(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and LABEL.fullmatch(node.value) and len(node.value) > 2}


def self_named(tree: ast.AST) -> set[str]:
    """`NAME = "NAME"`: a label constant, wherever it is written."""
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and LABEL.fullmatch(node.value.value)):
            found |= {t.id for t in node.targets if isinstance(t, ast.Name) and t.id == node.value.value}
    return found


def code_labels() -> set[str]:
    deciders = {path for pattern in DECIDERS for path in SOURCE.glob(pattern)}
    labels: set[str] = set()
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        labels |= self_named(tree)
        if path in deciders:
            labels |= constants(tree) - NOT_LABELS
    metrics = ast.parse((SOURCE / "metrics.py").read_text())
    for node in ast.walk(metrics):
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REASONS"
                                                 for t in node.targets)):
            labels |= set(ast.literal_eval(node.value))
    return labels


def documented_labels() -> set[str]:
    """The first column of the refusal table."""
    text = DOC.read_text()
    assert TABLE_HEADING in text, f"{DOC} has no section '{TABLE_HEADING}'"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, re.MULTILINE))


def test_the_extraction_finds_the_known_labels():
    """A guard on the parser: labels from each place they are made."""
    assert {"CONN_CAP", "PREGREET", "BANNED", "LINE_TOO_LONG", "RELAY_DENIED", "UNKNOWN_RCPT",
            "DHA_BAN", "SCORE_BAN", "FCRDNS_FAIL", "HELO_OURS", "BACKEND_DOWN",
            "IDLE_TIMEOUT"} <= code_labels()
    assert not NOT_LABELS & code_labels()


def test_every_label_in_the_code_is_explained():
    missing = code_labels() - documented_labels()
    assert not missing, (f"labels the gate gives that {DOC.name}'s table '{TABLE_HEADING[3:]}' "
                         f"does not explain: {sorted(missing)}")


def test_every_label_explained_is_still_in_the_code():
    stale = documented_labels() - code_labels()
    assert not stale, f"{DOC.name} explains labels the code no longer has: {sorted(stale)}"


def test_each_row_says_the_reply_and_what_to_do():
    section = DOC.read_text().split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    for row in re.findall(r"^\| `[A-Z0-9_]+` \|.*$", section, re.MULTILINE):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), f"a row needs label, when, reply, action: {row}"
