"""Prefix identity shared by the worker's prefix cache and the router's cache index."""
