"""The conv tuner's disk cache: what it stores, what it refuses, where it lives."""
import json

import pytest
import torch

from fxsparse.kernels import tuning_cache
from fxsparse.kernels.tuning_cache import TuningCache

KEY = (50176, 64, 64, 56, 56, 3, 3, 1, 1, 1, 1, 1, 1, torch.float16, 1, 1, None)
CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


def test_round_trip_through_a_new_instance(tmp_path):
    path = str(tmp_path / "sub" / "tune.json")
    TuningCache(path).put(KEY, CONFIG, 2)
    again = TuningCache(path)  # a new process: reads the file
    assert again.get(KEY) == (CONFIG, 2)
    other_dtype = KEY[:13] + (torch.bfloat16,) + KEY[14:]
    assert again.get(other_dtype) is None


def test_entries_accumulate(tmp_path):
    path = str(tmp_path / "tune.json")
    TuningCache(path).put(KEY, CONFIG, 1)
    key2 = (1,) + KEY[1:]
    TuningCache(path).put(key2, CONFIG, 4)
    cache = TuningCache(path)
    assert cache.get(KEY) == (CONFIG, 1) and cache.get(key2) == (CONFIG, 4)
    assert len(json.load(open(path))) == 2


def test_damaged_file_is_a_miss_not_an_error(tmp_path, caplog):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    assert TuningCache(str(path)).get(KEY) is None
    assert "unreadable tuning cache" in caplog.text


def test_path_names_device_and_triton_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    path = tuning_cache.cache_path("NVIDIA H100 80GB HBM3", "3.6.0")
    assert path == str(tmp_path / "conv2d-tuning-NVIDIA-H100-80GB-HBM3-triton3.6.0.json")


@pytest.mark.parametrize("value", ["cache", "always", "off"])
def test_modes(value, monkeypatch):
    monkeypatch.setenv("FXSPARSE_TUNE", value)
    assert tuning_cache.mode() == value


def test_bad_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("FXSPARSE_TUNE", "fast")
    with pytest.raises(ValueError, match="FXSPARSE_TUNE='fast'.*cache, always, off"):
        tuning_cache.mode()


def test_two_processes_writing_keep_each_others_shapes(tmp_path):
    path = str(tmp_path / "tune.json")
    first, second = TuningCache(path), TuningCache(path)
    assert first.get(KEY) is None and second.get(KEY) is None  # both loaded the empty file
    key2 = (2,) + KEY[1:]
    first.put(KEY, CONFIG, 1)
    second.put(key2, CONFIG, 2)  # must not drop what `first` wrote meanwhile
    cache = TuningCache(path)
    assert cache.get(KEY) == (CONFIG, 1) and cache.get(key2) == (CONFIG, 2)


def test_a_winner_counts_only_for_the_candidates_it_beat(tmp_path):
    from fxsparse.kernels.conv2d import conv_candidates

    old = conv_candidates(100352, 256, 256, 1, True, 132)
    new = conv_candidates(100352, 256, 64, 1, True, 132)  # other shape class: other tiles offered
    assert tuning_cache.signature(old) != tuning_cache.signature(new)
    assert tuning_cache.signature(old) == tuning_cache.signature(list(old))
    # winners chosen by another timing method are timed again
    assert tuning_cache.signature(old, "cuda-graph replay") != tuning_cache.signature(old)
    path = str(tmp_path / "tune.json")
    TuningCache(path).put(KEY, CONFIG, 1, tuning_cache.signature(old))
    cache = TuningCache(path)
    assert cache.get(KEY, tuning_cache.signature(old)) == (CONFIG, 1)
    assert cache.get(KEY, tuning_cache.signature(new)) is None  # new candidates: timed again
    TuningCache(path).put(KEY, CONFIG, 1)  # an entry from before signatures
    assert TuningCache(path).get(KEY, tuning_cache.signature(old)) is None
