"""`python -m app.apid`: the contract names the service pipeline-apid; same as `python -m app.api`."""
import sys

from .api.service import main

if __name__ == "__main__":
    main(sys.argv[1:])
