"""``python -m gradcomp`` (what ``torchrun ... -m gradcomp train`` runs)."""

import sys

from .cli import main

sys.exit(main())
