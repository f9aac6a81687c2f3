"""The worker's fast path for ordinary event lines: msgspec decodes a line into typed Structs in C
(types and id/quantity ranges checked there), and the payload's bytes are copied into the
prepared line instead of being parsed into a dict and printed again.

It only ever accepts: a line it is not sure of (any field it does not know, an escape in a string,
a payload not printed exactly as orjson would print it, an amount `money` refuses, another
shard's shop, a line near MAX_LINE_BYTES) goes to `rules.validate_exact`, the one path that
names rejections. So both paths give the same Event for every line, and the same prepared line
byte for byte (tests/test_worker_fast.py compares them on the fixtures and on hostile lines).

Why the copy is exact: the payload Struct of each type has only scalar fields, and the line is
taken only when msgspec prints the decoded Struct back to exactly the payload's bytes. Without a
backslash in the line, strings need no escaping, and for integers and the amounts `money` takes
(at most 13 integer digits and 2 decimals) msgspec and orjson print the same shortest text.
"""
from __future__ import annotations

import hashlib
from typing import Annotated, Union

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from ..events import MAX_ID, PRICE_CHANGE, PURCHASE, RESTOCK, RETURN, SHOP_STATUS

QTY_MAX = 2147483647   # INT
Id = Annotated[int, Meta(ge=0, le=MAX_ID)]
OrderId = Annotated[int, Meta(ge=-MAX_ID - 1, le=MAX_ID)]
Qty = Annotated[int, Meta(ge=-QTY_MAX, le=QTY_MAX)]
Number = Union[int, float]


class Line(Struct, forbid_unknown_fields=True):
    event_type: int
    timestamp: str
    payload: Raw
    saved_at: Union[str, UnsetType] = UNSET


class PurchasePayload(Struct, forbid_unknown_fields=True, kw_only=True):
    order_id: OrderId
    user_id: Id
    shop_id: Id
    good_id: Id
    qty: Qty
    price_at_order: Number


class ReturnPayload(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    order_id: OrderId
    user_id: Id
    shop_id: Union[Id, None, UnsetType] = UNSET
    good_id: Id
    qty: Qty
    refund_amount: Number


class RestockPayload(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    shop_id: Id
    good_id: Id
    delta_count: Qty
    reason: Union[str, UnsetType] = UNSET
    sub_event_type: Union[str, UnsetType] = UNSET


class PriceChangePayload(Struct, forbid_unknown_fields=True):
    shop_id: Id
    good_id: Id
    new_price: Number


class ShopStatusPayload(Struct, forbid_unknown_fields=True):
    shop_id: Id
    active: bool


LINE = msgspec.json.Decoder(Line)
PAYLOADS = {PURCHASE: msgspec.json.Decoder(PurchasePayload), RETURN: msgspec.json.Decoder(ReturnPayload),
            RESTOCK: msgspec.json.Decoder(RestockPayload), PRICE_CHANGE: msgspec.json.Decoder(PriceChangePayload),
            SHOP_STATUS: msgspec.json.Decoder(ShopStatusPayload)}
ENCODE = msgspec.json.Encoder().encode
SORTED = msgspec.json.Encoder(order="sorted").encode   # what orjson's OPT_SORT_KEYS prints, for these Structs
DecodeError = msgspec.DecodeError


# The dedup key's digest (`app.events.event_key`'s) is blake2b of SORTED([etype, payload Struct,
# timestamp]): the Struct's fields print sorted, as OPT_SORT_KEYS prints the dict. A copy of a
# fresh blake2b costs less than a new one.
BLAKE2B_16 = hashlib.blake2b(digest_size=16).copy
