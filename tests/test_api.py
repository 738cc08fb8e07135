"""The public API: every name in `audioshard.__all__` resolves to the thing the docs say, and importing the
package (what the command line does first) loads no torch."""

import subprocess
import sys

import pytest

import audioshard


def test_every_public_name_resolves_to_its_module_attribute():
    from audioshard import build, interop, loader, manifest, predict, train

    assert audioshard.__all__ == sorted(audioshard.__all__)
    for name in audioshard.__all__:
        assert getattr(audioshard, name) is not None, name
    assert audioshard.train_model is train.train
    assert audioshard.open_shards is loader.open_shards
    assert audioshard.build_shards is build.build_shards
    assert audioshard.load_manifest is manifest.load_manifest
    assert audioshard.Predictor is predict.Predictor
    assert audioshard.unblock is interop.unblock
    assert set(audioshard.__all__) <= set(dir(audioshard))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        audioshard.no_such_thing  # noqa: B018


def test_importing_the_package_loads_no_torch():
    code = "import sys, audioshard; print(audioshard.__all__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert "open_shards" in out[0] and "train_model" in out[0]
    assert out[1] == "False"
