"""Entry point of `python -m qil_core`."""

import sys

from .cli.entry import main

sys.exit(main())
