"""C{python -m unrealon ...}: the C{unrealon} command, where its script is not on the PATH."""

import sys

from unrealon.cli import main

sys.exit(main())
