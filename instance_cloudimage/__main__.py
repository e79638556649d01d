"""``python -m instance_cloudimage``: the instance-cloudimage command (the worker re-executes itself so)."""

from .cli import console_main

console_main()
