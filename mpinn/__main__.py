"""``python -m mpinn``: the same CLI as the ``mpinn`` console script."""

import sys

from mpinn.cli.commands import main

sys.exit(main())
