"""`python -m evalsvc` is the `evalsvc` command."""

import sys

from evalsvc.cli import main

sys.exit(main())
