"""``python -m instance_cloudimage``: the instance-cloudimage command."""

import sys

from .cli import main

sys.exit(main())
