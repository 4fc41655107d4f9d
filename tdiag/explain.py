"""``tdiag explain ID``: the section of docs/checks.md that documents a Finding id.

Every Finding's ``docs`` field is ``docs/checks.md#<anchor>`` (Contract 2): a path inside
the source tree, which an installed package does not have at that path. The docs ship
inside the package (``tdiag/docs/``, package data), so this module finds them wherever
tdiag is installed, and ``tdiag explain`` accepts an id (``grad.exploding``), an anchor
(``grad-exploding``) or the ``docs`` field itself (``docs/checks.md#grad-exploding``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DocsNotFound",
    "Section",
    "UnknownId",
    "checks_doc_path",
    "explain_command",
    "find_section",
    "sections",
]

_ANCHOR = re.compile(r'^<a id="([^"]+)"></a>\s*$')
_HEADING = re.compile(r"^(#{1,3}) ")
_ID_IN_HEADING = re.compile(r"^### `([^`]+)`")


class DocsNotFound(FileNotFoundError):
    """docs/checks.md is neither in the installed package nor in a source checkout."""


class UnknownId(ValueError):
    """No section of docs/checks.md has this id or anchor.

    Attributes:
        query: what was asked for.
        suggestions: the closest known ids (at most 5), best first.
    """

    def __init__(self, query: str, suggestions: list[str]) -> None:
        self.query, self.suggestions = query, suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"no Finding id {query!r} in docs/checks.md.{hint} "
            "`tdiag explain --list` prints every id."
        )


@dataclass(frozen=True)
class Section:
    """One documented id.

    Attributes:
        id: the Finding id (``grad.exploding``), read from the section's heading.
        anchor: its anchor in docs/checks.md (``grad-exploding``).
        text: the section's Markdown, heading included, without the anchor line.
    """

    id: str
    anchor: str
    text: str


def checks_doc_path() -> Path:
    """docs/checks.md: the copy shipped in the package, else the source checkout's.

    Raises:
        DocsNotFound: neither exists (a broken install).
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "docs" / "checks.md", package.parent / "docs" / "checks.md"):
        if candidate.is_file():
            return candidate
    raise DocsNotFound(
        f"docs/checks.md is not in the installed package ({package / 'docs'}) nor beside it: "
        "reinstall tdiag (pip install --force-reinstall tdiag), or read docs/checks.md in the "
        "source repository."
    )


def sections(text: str) -> list[Section]:
    """The sections of docs/checks.md that start with an ``<a id="…"></a>`` anchor; each runs
    to the next anchor or the next heading of level 1–3."""
    out: list[Section] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _ANCHOR.match(lines[i])
        if m is None:
            i += 1
            continue
        anchor, body = m.group(1), []
        j = i + 1
        while j < len(lines) and not _ANCHOR.match(lines[j]):
            if body and _HEADING.match(lines[j]):
                break
            body.append(lines[j])
            j += 1
        heading = _ID_IN_HEADING.match(body[0]) if body else None
        out.append(
            Section(
                id=heading.group(1) if heading else anchor,
                anchor=anchor,
                text="\n".join(body).strip(),
            )
        )
        i = j
    return out


def find_section(query: str, text: str | None = None) -> Section:
    """The section for an id, an anchor or a Finding's ``docs`` field.

    Args:
        query: ``grad.exploding``, ``grad-exploding`` or ``docs/checks.md#grad-exploding``.
        text: docs/checks.md's text (default: read from :func:`checks_doc_path`).

    Raises:
        UnknownId: nothing matches (with the closest ids as suggestions).
        DocsNotFound: docs/checks.md cannot be found.
    """
    if text is None:
        text = checks_doc_path().read_text(encoding="utf-8")
    key = query.strip()
    if "#" in key:
        key = key.rsplit("#", 1)[1]  # the docs field: only the anchor matters
    all_sections = sections(text)
    for section in all_sections:
        if key in (section.id, section.anchor) or key.replace(".", "-") == section.anchor:
            return section
    lowered = key.lower()
    for section in all_sections:
        if lowered in (section.id.lower(), section.anchor.lower()):
            return section
    ids = [s.id for s in all_sections]
    close = difflib.get_close_matches(key, ids, n=5, cutoff=0.5)
    if not close:  # a family or a word: every id that contains it
        close = [i for i in ids if lowered in i.lower()][:5]
    raise UnknownId(query, close)


def explain_command(finding_id: str | None, *, list_ids: bool = False) -> int:
    """``tdiag explain``: print the section (Markdown, rendered on a terminal), or every id.

    Returns:
        0 when printed; 2 for an unknown id (with suggestions, on stderr), no id given, or
        docs that cannot be found.
    """
    import sys

    from rich.console import Console
    from rich.markdown import Markdown

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        path = checks_doc_path()
        text = path.read_text(encoding="utf-8")
        if list_ids or finding_id is None:
            if finding_id is None and not list_ids:
                err.print("tdiag explain: give a Finding id (e.g. grad.exploding); the ids:")
            listed = sections(text)
            ids = [s.id for s in listed]
            for section in listed:  # an id documented twice (check and rule) shows its anchor
                twice = ids.count(section.id) > 1
                sys.stdout.write(
                    f"{section.id}  (#{section.anchor})\n" if twice else f"{section.id}\n"
                )
            return 0 if list_ids else 2
        section = find_section(finding_id, text)
    except (UnknownId, DocsNotFound) as exc:
        err.print(f"[bold red]tdiag explain:[/] {exc}", markup=True, soft_wrap=True)
        return 2
    if out.is_terminal:
        out.print(Markdown(section.text))
    else:  # a pipe or a file: the Markdown itself, unwrapped
        sys.stdout.write(section.text + "\n")
    sys.stdout.write(f"\n(docs/checks.md#{section.anchor}; file: {path})\n")
    for other in sections(text):
        if other.id == section.id and other.anchor != section.anchor:
            sys.stdout.write(f"Also documented: tdiag explain {other.anchor}\n")
    return 0
