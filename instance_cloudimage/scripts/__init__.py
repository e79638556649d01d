"""The OS-script entry: dispatch, one-line errors, exit codes."""
