"""``python -m lmstream_nb`` is the ``lmstream`` command."""

import sys

from .cli import main

sys.exit(main())
