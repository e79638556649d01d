"""The OS verbs: create, export, import, rename, verify."""
