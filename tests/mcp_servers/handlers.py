"""A field handler, as a tools file names one (tests/test_mcp.py): git_show
as JSON_FIELDS, so its call starts as soon as `revision` is written."""

from __future__ import annotations


def show_revision(field: str, value, state: dict):
    """`repo_path` is kept; `revision` makes the call (with the path seen)."""
    if field == "repo_path":
        state["repo_path"] = value
        return None
    if field == "revision":
        return "git_show", {"repo_path": state["repo_path"], "revision": value}
    raise ValueError(f"git_show takes repo_path and revision, not {field}")
