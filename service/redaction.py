"""Redaction of conversation details before they leave the gateway (DESIGN section 4).

Where the secrets live in the upstream `GetConversationResponseModel`:

- webhook request details: `transcript[].tool_calls[].tool_details` (type `webhook`: `headers`,
  `query_params`, `path_params`, `body`, and a `url` that may carry credentials or a query string) and
  `tool_details.webhook_details` (type `api_integration_webhook`); workflow tools repeat the same tool calls
  in `tool_results[].result.steps[].requests[]`, with nested results in `steps[].results[]`, to any depth;
- MCP tool arguments: `tool_details.parameters` (type `mcp`);
- dynamic variables: `conversation_initiation_client_data.dynamic_variables` (name -> value) and every
  `dynamic_variable_updates[]` list of tool results (`variable_name`, `old_value`, `new_value`);
- billing: `metadata.charging` and `metadata.cost`.

Rather than following the schema path by path (and silently missing a new nesting), the walk applies each
rule wherever its key appears, at any depth, and tolerates any shape: missing keys, nulls, wrong types.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

WEBHOOK_REQUEST_KEYS = frozenset({"headers", "query_params", "path_params", "body"})
TOOL_DETAIL_KEYS = frozenset({"tool_details", "webhook_details"})
# Lists whose items are tool calls or tool results: request details are stripped from the items too, in case
# a schema revision moves them up a level.
TOOL_LIST_KEYS = frozenset({"tool_calls", "tool_results", "requests", "results"})
SECRET_PREFIX = "secret__"  # noqa: S105 - a name prefix, not a secret
METADATA_SECRET_KEYS = ("charging", "cost")
WILDCARD = "*"
# Stands in for a list item a REDACT_FIELDS path removed until every path has run (see `_remove_path`).
_REMOVED: Final = object()


def is_secret_name(name: Any) -> bool:
    """Tell whether a dynamic variable name marks a secret (`secret__...`, any case)."""
    return isinstance(name, str) and name.lower().startswith(SECRET_PREFIX)


def redact(details: dict[str, Any], extra_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return a redacted copy of conversation details; `extra_paths` are dotted paths (`*` = any item/key)."""
    cleaned = _walk(details, None)
    if not isinstance(cleaned, dict):
        return {}
    metadata = cleaned.get("metadata")
    if isinstance(metadata, dict):
        for key in METADATA_SECRET_KEYS:
            metadata.pop(key, None)
    removed_items = False
    for path in extra_paths:
        parts = [part for part in path.strip().split(".") if part]
        if parts:
            removed_items |= _remove_path(cleaned, parts)
    if removed_items:
        _drop_removed_items(cleaned)
    return cleaned


def _walk(value: Any, key: str | None) -> Any:
    """Copy `value`, applying the rule of the key it sits under (and of every key below it)."""
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
        if key in TOOL_DETAIL_KEYS:
            items = _tool_details_items(value)
        elif key == "dynamic_variables":
            items = ((name, item) for name, item in value.items() if not is_secret_name(name))
        return {name: _walk(item, name if isinstance(name, str) else None) for name, item in items}
    if isinstance(value, list):
        if key == "dynamic_variable_updates":
            return [_walk(item, None) for item in value if not _is_secret_update(item)]
        if key in TOOL_LIST_KEYS:
            return [_walk(_without_request_keys(item), None) for item in value]
        return [_walk(item, None) for item in value]
    return value


def _tool_details_items(details: dict[str, Any]) -> Iterable[tuple[Any, Any]]:
    # `parameters` is the MCP tool's arguments; a client tool's `parameters` is what the caller's own app
    # received, so only that type keeps it.
    keep_parameters = details.get("type") == "client"
    for name, item in details.items():
        if name in WEBHOOK_REQUEST_KEYS or (name == "parameters" and not keep_parameters):
            continue
        if name == "url" and isinstance(item, str):
            yield name, _strip_url(item)
        else:
            yield name, item


def _without_request_keys(item: Any) -> Any:
    if isinstance(item, dict):
        return {name: value for name, value in item.items() if name not in WEBHOOK_REQUEST_KEYS}
    return item


def _is_secret_update(item: Any) -> bool:
    return isinstance(item, dict) and is_secret_name(item.get("variable_name"))


def _strip_url(url: str) -> str:
    """Drop the user info, query and fragment of a webhook URL: they may carry credentials or keys."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _remove_path(node: Any, parts: list[str]) -> bool:
    """Remove the value at a dotted path (already split) from `node`, in place; absent paths are no-ops.

    A list item is replaced by a placeholder rather than deleted, so that every path's indexes keep naming the
    items of the upstream document (`x.0` and `x.1` are its first two items, not the first and third); return
    whether a placeholder was left, for `_drop_removed_items` to sweep once all paths have run.
    """
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        if head == WILDCARD:
            if not rest:
                node.clear()
                return False
            return _remove_in_each(node.values(), rest)
        if not rest:
            node.pop(head, None)
        elif head in node:
            return _remove_path(node[head], rest)
    elif isinstance(node, list):
        if head == WILDCARD:
            if not rest:
                node.clear()
                return False
            return _remove_in_each(node, rest)
        if head.isdigit() and int(head) < len(node):
            if rest:
                return _remove_path(node[int(head)], rest)
            node[int(head)] = _REMOVED
            return True
    return False


def _remove_in_each(children: Iterable[Any], rest: list[str]) -> bool:
    removed = False
    for child in children:
        removed |= _remove_path(child, rest)
    return removed


def _drop_removed_items(node: Any) -> None:
    if isinstance(node, dict):
        for child in node.values():
            _drop_removed_items(child)
    elif isinstance(node, list):
        node[:] = [child for child in node if child is not _REMOVED]
        for child in node:
            _drop_removed_items(child)
