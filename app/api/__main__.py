import sys

from .service import main

main(sys.argv[1:])
