"""``python -m sap_fast``: the ``sap-fast`` command line (see :mod:`sap_fast.cli`)."""
import sys

from .cli import main

sys.exit(main())
