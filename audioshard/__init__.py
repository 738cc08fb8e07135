"""audioshard: train audio classifiers from sharded, streamed data.

Stages, each a module, data flowing one way:
acquire -> build (shards + manifest) -> stream (batches) -> train -> evaluate / predict.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `audioshard.unblock` without importing torch for every `import audioshard` (the command line's start-up)
    if name == "unblock":
        from audioshard.interop import unblock

        return unblock
    raise AttributeError(f"module 'audioshard' has no attribute {name!r}")
