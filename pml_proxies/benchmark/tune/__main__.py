"""``python -m pml_proxies.benchmark.tune``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
