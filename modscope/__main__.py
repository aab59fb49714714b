"""``python -m modscope``: the same as the ``modscope`` command."""

import sys

from .cli import main

sys.exit(main())
