"""Shopping cart reconciler in Python: the twin of plugins/cart (same state format, same
operations, same canonical output; see plugins/cart/README.md).

An observed-remove set: every add gets a tag "actor:counter"; a remove hides the tags it
has seen, so a concurrent add (a tag the remove has not seen) wins over the remove.

Built by host/guests/build.rs with componentize-py and --stub-wasi: the component imports
nothing, like every reconciler.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    Merged_Tombstone,
    Merged_Value,
    PluginError_InvalidOp,
    PluginError_InvalidValue,
)

U64_MAX = 2**64 - 1


def _invalid_value(message):
    return Err(PluginError_InvalidValue(message))


def _parse_tag(tag):
    """Splits "actor:counter" (the actor may contain ':'); None if malformed."""
    if not isinstance(tag, str) or ":" not in tag:
        return None
    actor, counter = tag.rsplit(":", 1)
    if not counter.isascii() or not counter.isdigit():
        return None
    value = int(counter)
    return (actor, value) if value <= U64_MAX else None


def _tag_map(state, field):
    raw = state.get(field, {})
    if not isinstance(raw, dict):
        raise _invalid_value(f"cart field {field!r} must be an object")
    out = {}
    for item, tags in raw.items():
        if not isinstance(tags, list):
            raise _invalid_value(f"cart tags of {item!r} must be a list")
        for tag in tags:
            if _parse_tag(tag) is None:
                raise _invalid_value(f"cart tag {tag!r} is not \"actor:counter\"")
        out[item] = set(tags)
    return out


def _parse(value):
    try:
        state = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _invalid_value(f"cart state is not valid JSON: {e}")
    if not isinstance(state, dict):
        raise _invalid_value("cart state must be a JSON object")
    unknown = set(state) - {"adds", "removed"}
    if unknown:
        raise _invalid_value(f"unknown cart fields: {sorted(unknown)}")
    return _tag_map(state, "adds"), _tag_map(state, "removed")


def _absorb(into, other):
    for item, tags in other.items():
        into.setdefault(item, set()).update(tags)


def _encode(adds, removed):
    """Strips removed tags from adds, drops empty entries, and writes canonical JSON (sorted,
    compact, UTF-8), so that equal carts are equal bytes, as in the Rust cart."""
    for item, gone in removed.items():
        if item in adds:
            adds[item] -= gone
    state = {
        "adds": {item: sorted(tags) for item, tags in sorted(adds.items()) if tags},
        "removed": {item: sorted(tags) for item, tags in sorted(removed.items()) if tags},
    }
    return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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
        return Merged_Value(_encode(adds, removed))

    def update(self, current, op, actor):
        adds, removed = _parse(current) if current is not None else ({}, {})
        try:
            parsed = json.loads(op.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise Err(PluginError_InvalidOp(f"expected {{\"add\":\"item\"}} or {{\"remove\":\"item\"}}: {e}"))
        if (
            not isinstance(parsed, dict)
            or len(parsed) != 1
            or next(iter(parsed)) not in ("add", "remove")
            or not isinstance(next(iter(parsed.values())), str)
        ):
            raise Err(PluginError_InvalidOp("expected {\"add\":\"item\"} or {\"remove\":\"item\"}"))
        (kind, item), = parsed.items()
        if kind == "add":
            # One past any counter of this actor, live or removed, so a re-add is a new tag.
            counters = [
                parsed_tag[1]
                for tags in list(adds.values()) + list(removed.values())
                for parsed_tag in map(_parse_tag, tags)
                if parsed_tag is not None and parsed_tag[0] == actor
            ]
            counter = max(counters, default=0) + 1
            if counter > U64_MAX:
                raise _invalid_value(f"counter of {actor!r} overflows")
            adds.setdefault(item, set()).add(f"{actor}:{counter}")
        elif item in adds:
            # Removing an absent item is a no-op: the client may act on a stale view.
            removed.setdefault(item, set()).update(adds.pop(item))
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
