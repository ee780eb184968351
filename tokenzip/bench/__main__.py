"""``python -m tokenzip.bench ...`` (also under torchrun) = ``tokenzip bench ...``."""

import sys

from .cli import run

sys.exit(run())
