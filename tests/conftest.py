import os
import sys

import mace  # noqa: F401  (before e3nn)

sys.path.insert(0, os.path.dirname(__file__))
