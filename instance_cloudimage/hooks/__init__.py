"""Administrators' hooks: finding them, what they are told, running them."""
