"""The selector's disk cache: what it stores, what it refuses, where it lives, and the table shipped
with fxsparse beneath the user's file."""
import json

from fxsparse.kernels import tuning_cache
from fxsparse.kernels.tuning_cache import TuningCache

KEY = "ConvProblem(batch=16, height=56, width=56, ...)"
ENTRY = dict(choice="ws_box", config=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4,
                                          num_stages=6), split_k=1)


def test_round_trip_through_a_new_instance(tmp_path):
    path = str(tmp_path / "sub" / "tune.json")
    TuningCache(path).put(KEY, ENTRY, "sig")
    again = TuningCache(path)  # a new process: reads the file
    got = again.get(KEY, "sig")
    assert got["config"] == ENTRY["config"] and got["choice"] == "ws_box" and got["source"] == "tuning cache"
    assert again.get("another shape") is None


def test_entries_accumulate(tmp_path):
    path = str(tmp_path / "tune.json")
    TuningCache(path).put(KEY, ENTRY)
    TuningCache(path).put("k2", dict(ENTRY, split_k=4))
    cache = TuningCache(path)
    assert cache.get(KEY)["split_k"] == 1 and cache.get("k2")["split_k"] == 4
    assert len(json.load(open(path))) == 2


def test_damaged_file_is_a_miss_not_an_error(tmp_path, caplog):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    assert TuningCache(str(path)).get(KEY) is None
    assert "unreadable tuning cache" in caplog.text


def test_path_names_device_sms_and_triton_major_minor(tmp_path):
    slug = tuning_cache.device_slug("NVIDIA H100 80GB HBM3", (9, 0), 132, "3.6.0")
    assert slug == "sm90-132sm-NVIDIA-H100-80GB-HBM3-triton3.6"
    assert tuning_cache.device_slug("NVIDIA H100 80GB HBM3", (9, 0), 132, "3.6.1") == slug  # patch releases share
    path = tuning_cache.cache_path(slug, str(tmp_path))
    assert path.startswith(str(tmp_path)) and slug in path
    assert tuning_cache.shipped_path(slug).endswith(f"fxsparse/kernels/tuned/{slug}.json")


def test_signature_tracks_the_offered_candidates():
    old = [("pointer", {"BLOCK_M": 64}, 1), ("ws_box", {"BLOCK_M": 128}, 1)]
    new = old + [("tma_box", {"BLOCK_M": 64}, 2)]
    assert tuning_cache.signature(old) == tuning_cache.signature(list(old))
    assert tuning_cache.signature(old) != tuning_cache.signature(new)
    assert tuning_cache.signature(old, "cuda-graph replay") != tuning_cache.signature(old)


def test_entry_from_other_candidates_is_a_miss(tmp_path):
    path = str(tmp_path / "tune.json")
    TuningCache(path).put(KEY, ENTRY, "old")
    assert TuningCache(path).get(KEY, "old") is not None
    assert TuningCache(path).get(KEY, "new") is None  # new candidates offered: timed again


def test_shipped_table_lies_under_the_users_file(tmp_path):
    """A shape the user's file lacks is read from the shipped table (read-only: writes go to the
    user's file); where both hold it, the user's entry wins; a stale shipped entry is a miss."""
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({KEY: dict(ENTRY, candidates="sig"), "stale": dict(ENTRY, candidates="old")}))
    user = str(tmp_path / "user" / "tune.json")
    cache = TuningCache(user, str(shipped))
    got = cache.get(KEY, "sig")
    assert got["source"] == "shipped table" and got["config"] == ENTRY["config"]
    assert cache.get("stale", "sig") is None
    cache.put(KEY, dict(ENTRY, choice="pointer"), "sig")
    assert json.loads(shipped.read_text())[KEY]["choice"] == "ws_box"  # the table is never written
    again = TuningCache(user, str(shipped)).get(KEY, "sig")
    assert again["source"] == "tuning cache" and again["choice"] == "pointer"


def test_a_missing_shipped_table_is_no_error(tmp_path):
    assert TuningCache(str(tmp_path / "u.json"), str(tmp_path / "absent.json")).get(KEY) is None
