"""Helpers shared by the test suites (network namespaces, ...)."""
