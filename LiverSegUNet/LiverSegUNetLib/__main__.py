"""``python -m LiverSegUNetLib`` runs the ``liverseg`` command."""

import sys

from .cli import main

sys.exit(main())
