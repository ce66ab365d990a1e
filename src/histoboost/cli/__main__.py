"""`python -m histoboost.cli`."""

import sys

from . import main

sys.exit(main())
