"""Shopping cart reconciler in Python: the twin of plugins/cart (Rust).

An observed-remove set whose removes stick unless a concurrent add re-adds the item. The
state format, merge and operations are those of plugins/cart/README.md, byte for byte:
the output is canonical JSON (keys and tags sorted, no whitespace, non-ASCII as UTF-8),
so the Rust and Python plugins produce identical bytes and can serve the same bucket.
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    Merged_Tombstone,
    Merged_Value,
    PluginError_InvalidOp,
    PluginError_InvalidValue,
)

# Rust's u64 parser accepts an optional '+' and ASCII digits, nothing else.
_COUNTER = re.compile(r"\+?[0-9]+")
_U64_MAX = 2**64 - 1


def _invalid(message):
    return Err(PluginError_InvalidValue(message))


def _parse_tag(tag):
    """Splits "actor:counter" (the actor may contain ':'); None if malformed."""
    if not isinstance(tag, str) or ":" not in tag:
        return None
    actor, counter = tag.rsplit(":", 1)
    if not _COUNTER.fullmatch(counter):
        return None
    value = int(counter)
    if value > _U64_MAX:
        return None
    return actor, value


def _tag_map(value, field):
    """A JSON object of item -> list of tags, as a dict of sets."""
    if not isinstance(value, dict):
        raise _invalid(f"cart field {field!r} must be an object of tag lists")
    out = {}
    for item, tags in value.items():
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _invalid(f"cart field {field!r}: item {item!r} must map to a list of tags")
        for tag in tags:
            if _parse_tag(tag) is None:
                raise _invalid(f'cart tag {tag!r} is not "actor:counter"')
        out[item] = set(tags)
    return out


def _parse(data):
    try:
        state = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _invalid(f"cart state is not valid JSON: {e}")
    if not isinstance(state, dict):
        raise _invalid("cart state must be a JSON object")
    unknown = set(state) - {"adds", "removed"}
    if unknown:
        raise _invalid(f"cart state has unknown fields: {sorted(unknown)}")
    adds = _tag_map(state.get("adds", {}), "adds")
    removed = _tag_map(state.get("removed", {}), "removed")
    return adds, removed


def _normalize(adds, removed):
    """Drops removed tags from adds, then empty entries (keeps merge associative)."""
    for item, gone in removed.items():
        if item in adds:
            adds[item] -= gone
    adds = {i: t for i, t in adds.items() if t}
    removed = {i: t for i, t in removed.items() if t}
    return adds, removed


def _encode(adds, removed):
    state = {
        "adds": {i: sorted(adds[i]) for i in sorted(adds)},
        "removed": {i: sorted(removed[i]) for i in sorted(removed)},
    }
    text = json.dumps(state, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _absorb(into, other):
    for item, tags in other.items():
        into.setdefault(item, set()).update(tags)


class Reconciler(exports.Reconciler):
    def merge(self, siblings):
        live = [s for s in siblings if not s.tombstone]
        if not live:
            return Merged_Tombstone()
        adds, removed = {}, {}
        for sibling in live:
            a, r = _parse(sibling.value)
            _absorb(adds, a)
            _absorb(removed, r)
        adds, removed = _normalize(adds, removed)
        return Merged_Value(_encode(adds, removed))

    def update(self, current, op, actor):
        adds, removed = _parse(current) if current is not None else ({}, {})
        try:
            parsed = json.loads(bytes(op).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise Err(PluginError_InvalidOp(f'expected {{"add":"item"}} or {{"remove":"item"}}: {e}'))
        if (
            not isinstance(parsed, dict)
            or len(parsed) != 1
            or next(iter(parsed)) not in ("add", "remove")
            or not isinstance(next(iter(parsed.values())), str)
        ):
            raise Err(PluginError_InvalidOp('expected {"add":"item"} or {"remove":"item"}'))
        (kind, item), = parsed.items()
        if kind == "add":
            highest = max(
                (c for tags in list(adds.values()) + list(removed.values())
                 for t in tags
                 for (a, c) in [_parse_tag(t)] if a == actor),
                default=0,
            )
            if highest >= _U64_MAX:
                raise _invalid(f"counter of {actor!r} overflows")
            adds.setdefault(item, set()).add(f"{actor}:{highest + 1}")
        elif item in adds:
            # Removing an absent item is a no-op: the client may act on a stale view.
            removed.setdefault(item, set()).update(adds.pop(item))
        adds, removed = _normalize(adds, removed)
        return _encode(adds, removed)

    def examples(self):
        return [
            s.encode("utf-8")
            for s in [
                '{"adds":{},"removed":{}}',
                '{"adds":{"apple":["n1:1"]},"removed":{}}',
                '{"adds":{"apple":["n2:1"],"pear":["n2:2"]},"removed":{}}',
                '{"adds":{"pear":["n1:3"]},"removed":{"apple":["n1:1"]}}',
                '{"adds":{"apple":["n1:1","n3:7"],"plum":["n3:8"]},"removed":{"pear":["n2:2"]}}',
            ]
        ]
