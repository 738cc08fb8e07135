"""audioshard: train audio classifiers from sharded, streamed data.

Stages, each a module, data flowing one way:
acquire -> build (shards + manifest) -> stream (batches) -> train -> evaluate / predict.

The public API is importable from here (`import audioshard; audioshard.open_shards(...)`); each name
loads its module on first use, so `import audioshard` and the command line start without torch:

    cfg = audioshard.load_config(overrides=["train.epochs=30"])
    audioshard.build_shards("raw/", "shards/", cfg)
    audioshard.train_model("shards/", "runs/first", cfg)
    audioshard.evaluate_checkpoint("runs/first/best_model.pt", "shards/", "test", "runs/first/test")
    audioshard.Predictor("runs/first/best_model.pt").predict_file("new.wav").label
    for batch in audioshard.open_shards("shards/", "train", batch_size=64): ...
    cached = audioshard.Fetcher(cache_dir="/scratch/cache", cache_limit=20 << 30, timeout=30, retries=4)
    loader = audioshard.open_shards("https://host/build/", "train", fetcher=cached)  # each shard downloaded once

(`train_model` is `audioshard.train.train`: the package attribute `train` is the module once it is
imported, so the function has a name of its own.) The Lightning data module is
`audioshard.lightning.ShardDataModule` (the optional extra `lightning`).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "load_config": ("config", "load_config"),
    "Config": ("config", "Config"),
    "build_shards": ("build", "build_shards"),
    "load_manifest": ("manifest", "load_manifest"),
    "Manifest": ("manifest", "Manifest"),
    "open_shards": ("loader", "open_shards"),
    "Fetcher": ("remote", "Fetcher"),
    "ShardStream": ("stream", "ShardStream"),
    "Batch": ("stream", "Batch"),
    "train_model": ("train", "train"),
    "evaluate_checkpoint": ("evaluate", "evaluate_checkpoint"),
    "read_checkpoint": ("checkpoint", "read_checkpoint"),
    "Predictor": ("predict", "Predictor"),
    "predict_files": ("predict", "predict_files"),
    "export_model": ("export", "export_model"),
    "unblock": ("interop", "unblock"),
    "unblock_batch": ("interop", "unblock_batch"),
    "AudioshardError": ("errors", "AudioshardError"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'audioshard' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(f"audioshard.{module}"), attribute)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
