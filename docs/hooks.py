"""MkDocs hook: pages that quote the code's own tables get them generated at build time.

``<!-- causes -->`` in a page becomes the diagnosis cause catalogue, read from
:data:`stabilize.diagnosis.rules.RULES` and ``ADVICE``, so the documented causes, their order and
their advice cannot drift from the code.
"""

from __future__ import annotations


def cause_table() -> str:
    """The cause catalogue as a Markdown table: order, name, definition, advice."""
    from stabilize.diagnosis.rules import ADVICE, RULES

    rows = ["| # | cause | when | advice |", "|---|---|---|---|"]
    for i, rule in enumerate(RULES, 1):
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        rows.append(f"| {i} | `{rule.name}` | {cell(rule.definition)} | {cell(ADVICE.get(rule.name, ''))} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - the MkDocs hook signature
    if "<!-- causes -->" in markdown:
        markdown = markdown.replace("<!-- causes -->", cause_table())
    return markdown
