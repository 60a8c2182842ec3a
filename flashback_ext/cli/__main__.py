"""``python -m flashback_ext.cli`` (what ``torchrun ... -m`` launches) = the ``flashback`` command."""
import sys

from . import main

sys.exit(main())
