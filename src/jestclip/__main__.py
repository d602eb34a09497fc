"""``python -m jestclip ...``: the ``jestclip`` command where its entry point is not installed (a tree on
``PYTHONPATH``; ``torchrun -m jestclip``)."""

import sys

from jestclip.cli import main

sys.exit(main())
