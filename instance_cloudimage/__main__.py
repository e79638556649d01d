"""``python -m instance_cloudimage``: the instance-cloudimage command."""

from .cli import console_main

console_main()
