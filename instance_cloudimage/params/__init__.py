"""The OS parameters: declared once, checked by verify and create."""
