"""The runtime: errors, logging, the one subprocess wrapper, settings tables, site configuration, local paths."""
