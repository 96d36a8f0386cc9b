"""Smooth-AP training pipeline for large-scale image retrieval.

Importing this package does nothing: no environment is read, no process group
is created, no heavy dependency is imported.
"""

__version__ = "0.1.0"
