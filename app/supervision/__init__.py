"""Running the process group: supervisord's config and entry point (`supervise`), the FATAL
listener, the local run behind `bin/pipeline` and its private MariaDB."""
