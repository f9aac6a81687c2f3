"""event-ingest: writes event files into $SHARED_DIR/events and registers them with the API.

`python -m app.ingest` (daemon, `--files`, `--import`); `service` is the writer and registrar,
`generator` the data model of the files it writes.
"""
