"""mysql-sender: loads a shard's prepared files into that shard's MySQL, each exactly once.

`python -m app.sender --shard N`; `stage` is the daemon's part, `loader` the one-transaction
bulk load of one file.
"""
