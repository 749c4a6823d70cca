"""Bundled models; each subpackage is a model factory module."""
