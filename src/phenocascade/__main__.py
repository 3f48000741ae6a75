"""Allow ``python -m phenocascade``."""

import sys

from phenocascade.cli import main

sys.exit(main())
