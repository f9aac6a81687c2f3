"""pipeline-apid: the HTTP API over the tracking table, its only writer.

`python -m app.api` (alias `python -m app.apid`) serves it under gunicorn; `service` holds the
routes and their validation, `tracking` the state machine they call.
"""
