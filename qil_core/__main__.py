"""Entry point of `python -m qil_core`."""

import sys

from .cli import main

sys.exit(main())
