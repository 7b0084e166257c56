"""``python -m pyvdpa``: the ``pyvdpa`` command."""

import sys

from pyvdpa.cli import main

sys.exit(main())
