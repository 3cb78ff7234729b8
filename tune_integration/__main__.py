"""``python -m tune_integration service start|status|stop``: the ``modelbatch`` console script."""

import sys

from ._cli import main

sys.exit(main())
