"""Helpers shared by the tests: real images, a real HTTP server, cloud-init read-back."""
