"""``python -m sslcli`` (and ``torchrun -m sslcli``) runs the ``ssl`` command."""

import sys

from sslcli.cli.app import main

sys.exit(main())
