"""shard-worker: dedup, business rules and the out-of-order hold for one shard.

`python -m app.worker --shard N`; `stage` decides a file in batches, `rules` are the pure
business rules, `ledger` the money, `state` the rest of the shard's state in MySQL.
"""
