"""``python -m sftune`` (also what ``torchrun -m sftune`` and ``accelerate launch -m sftune`` run)."""

import sys

from sftune.cli import main

sys.exit(main())
