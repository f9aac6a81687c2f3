"""shard-splitter: each source file's lines into one file per shard, rejected lines kept with reasons.

`python -m app.splitter`; `stage` is the daemon's work on one file, `reasons` the rejected-line
reasons, `order_index` how a return without shop_id finds its shard.
"""
