"""The instance-cloudimage console command."""
