"""``python -m echo_env COMMAND [key=value ...]``: the same as ``echo-prefix``."""

import sys

from echo_env.cli import main

sys.exit(main())
