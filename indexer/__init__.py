"""forvalue.indexer: the engine and the offline side.

A model's forward pass over samples (forward.py, vision.py, features.py), exact For-Value scores (score.py)
and their token-level explanations (explain.py), the sketch that makes a training sample's G a vector
(sketch.py), index builds (build.py, raybuild.py) into a versioned store on disk (store*.py, files.py),
and the in-process `Index` that answers queries (index.py: first stage, certified pruning in rerank.py,
exact re-ranking). Torch-free modules the client shares: config.py, results.py, errors.py, data.py,
images.py, filters.py. The README's "Where things are" lists every module.
"""

__version__ = "0.1.0"
