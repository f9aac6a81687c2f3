"""The event line format every stage reads (see ../shared/contract.md): the event types, the
range of ids, and the business key that deduplication and the shard's `events.event_key` use.

The splitter routes by it (splitter/reasons.py), the worker validates and decides by it
(worker/rules.py: `validate` makes a line an `Event`), the sender checks prepared lines by it.
Lines are parsed with orjson (the standard json module is ~6x slower here) and `order_id` stays
an exact 64-bit integer: it is never routed through a float.
"""
from __future__ import annotations

import hashlib

import orjson

RESTOCK, PURCHASE, PRICE_CHANGE, RETURN, SHOP_STATUS = 0, 1, 2, 3, 4
EVENT_TYPES = {RESTOCK: "restock", PURCHASE: "purchase", PRICE_CHANGE: "price_change",
               RETURN: "return", SHOP_STATUS: "shop_status"}
MAX_ID = 2**63 - 1  # ids go to BIGINT columns downstream
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # written with the last three digits cut: milliseconds


def event_key(event: dict) -> str:
    """The business key deduplication uses: type and order for purchases and returns, a stable
    hash of type, payload and timestamp for the rest."""
    etype = event["event_type"]
    payload = event["payload"]
    order_id = payload.get("order_id")
    if etype in (PURCHASE, RETURN) and isinstance(order_id, int) and not isinstance(order_id, bool):
        return f"{etype}:{order_id}"
    digest = hashlib.blake2b(
        orjson.dumps([etype, payload, event.get("timestamp")], option=orjson.OPT_SORT_KEYS),
        digest_size=16).hexdigest()
    return f"{etype}:h{digest}"
