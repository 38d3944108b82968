"""``python -m grokinterp`` is the ``grokinterp`` command."""

import sys

from grokinterp.cli import main

sys.exit(main())
