"""forvalue.indexer: the exact For-Value engine (forward pass, scores) and, later, the influence index."""

__version__ = "0.1.0"
