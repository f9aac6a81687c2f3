"""Which shard an event line belongs to, or why it belongs to none (the rejected reasons).

The splitter parses every line (orjson) but writes the original bytes; these are the only
checks it makes: enough to route a line, and to reject what no shard could take.
"""
from __future__ import annotations

from .. import events

MALFORMED_JSON = "malformed_json"            # not JSON, or not an object with a 'payload' object
UNKNOWN_EVENT_TYPE = "unknown_event_type"    # event_type missing or not one of 0..4
MISSING_SHOP_ID = "missing_shop_id"          # no shop_id (only returns may omit it)
NON_INTEGER_SHOP_ID = "non_integer_shop_id"  # shop_id is a string, float, bool, object...
SHOP_ID_OUT_OF_RANGE = "shop_id_out_of_range"  # negative, or beyond 64-bit signed
UNROUTABLE = "unroutable"                    # a return without shop_id whose purchase was never seen
UNREGISTERED_SHARD = "unregistered_shard"    # the file was registered without this line's shard
EMPTY_LINE = "empty_line"                    # a blank line
TOO_LARGE = "too_large"                      # longer than MAX_LINE_BYTES (read past, never held whole)

REASONS = (MALFORMED_JSON, UNKNOWN_EVENT_TYPE, MISSING_SHOP_ID, NON_INTEGER_SHOP_ID, SHOP_ID_OUT_OF_RANGE,
           UNROUTABLE, UNREGISTERED_SHARD, EMPTY_LINE, TOO_LARGE)
# A line the decoder cannot follow to its end for nesting (msgspec gives up near 1000 levels):
# rejected as malformed_json with this detail. Shallower nesting is the worker's to judge
# (MAX_JSON_DEPTH): routing reads three fields, and checking depth here would cost every line.
TOO_DEEP = "malformed_json/too_deep"
DETAILS = {TOO_DEEP: (MALFORMED_JSON, "nested too deep to parse")}
EVENT_TYPES = frozenset(events.EVENT_TYPES)
MAX_ID = events.MAX_ID
