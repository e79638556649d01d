"""``python -m instance_cloudimage``: the instance-cloudimage command."""

import sys

from instance_cloudimage.cli.main import main

sys.exit(main())
