"""InstColor Service: HTTP API, batching, queue backends, metrics, settings and the command line.

Depends on ``models`` (pure PyTorch); ``models`` never imports from here.
"""

__version__ = "0.1.0"
