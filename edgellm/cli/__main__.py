"""``python -m edgellm.cli``: the ``edgellm`` command."""

import sys

from edgellm.cli import main

sys.exit(main())
