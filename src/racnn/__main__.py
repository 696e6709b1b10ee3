"""``python -m racnn`` (also what ``torchrun -m racnn`` runs)."""

import sys

from .cli import main

sys.exit(main())
