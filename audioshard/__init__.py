"""audioshard: train audio classifiers from sharded, streamed data.

Stages, each a module, data flowing one way:
acquire -> build (shards + manifest) -> stream (batches) -> train -> evaluate / predict.
"""

__version__ = "0.1.0"
