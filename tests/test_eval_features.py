"""Feature extraction and the content-keyed feature cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import filelock
import pytest
import torch

from vtab.evaluation.backbones import create_backbone
from vtab.evaluation.data import ImageSplit, Split, open_split
from vtab.evaluation.features import (
    FeatureCache,
    FeatureSet,
    TransformSpec,
    cache_fields,
    extract_features,
    extract_reusing,
    resolve_precision,
)
from vtab.evaluation.schemas import BackboneConfig

FIELDS = {"backbone": {"source": "test", "name": "toy", "weights_id": "random-seed0"},
          "data": {"dataset": "toy", "split": "train800", "split_sha256": "00"}}


class Counting:
    """A compute function that records its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self) -> FeatureSet:
        self.calls += 1
        time.sleep(self.delay)
        return FeatureSet(torch.arange(12.0).view(4, 3), torch.tensor([0, 1, 1, 0]),
                          ["a", "b", "c", "d"], {"missing_keys": 2})


def assert_same(a: FeatureSet, b: FeatureSet) -> None:
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert (a.paths, a.meta) == (b.paths, b.meta)


def test_second_call_hits_without_computing(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    first, hit = cache.get_or_compute(FIELDS, compute)
    assert not hit
    second, hit = cache.get_or_compute(FIELDS, compute)
    assert hit and compute.calls == 1
    assert_same(first, second)
    key = cache.key(FIELDS)
    manifest = json.loads((tmp_path / key[:2] / f"{key}.json").read_text())
    assert manifest["shape"] == [4, 3] and manifest["fields"] == FIELDS


def test_key_depends_on_every_field() -> None:
    changed = {**FIELDS, "data": {**FIELDS["data"], "split_sha256": "01"}}
    assert FeatureCache.key(FIELDS) != FeatureCache.key(changed)
    assert FeatureCache.key(FIELDS) == FeatureCache.key(json.loads(json.dumps(FIELDS)))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_payload"])
def test_damaged_entry_is_detected_and_recomputed(tmp_path: Path, damage: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    cache.get_or_compute(FIELDS, compute)
    key = cache.key(FIELDS)
    payload = tmp_path / key[:2] / f"{key}.pt"
    data = bytearray(payload.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    elif damage == "truncate":
        payload.write_bytes(bytes(data[:100]))
    else:
        payload.unlink()
    with caplog.at_level(logging.WARNING):
        again, hit = cache.get_or_compute(FIELDS, compute)
    assert not hit and compute.calls == 2
    assert str(payload) in caplog.text
    assert_same(again, compute())
    assert cache.load(key) is not None  # rewritten whole


def test_missing_manifest_is_a_miss(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    cache.get_or_compute(FIELDS, compute)
    key = cache.key(FIELDS)
    (tmp_path / key[:2] / f"{key}.json").unlink()
    assert cache.load(key) is None
    assert cache.get_or_compute(FIELDS, compute)[1] is False and compute.calls == 2


def test_concurrent_requests_compute_once(tmp_path: Path) -> None:
    compute = Counting(delay=0.5)
    hits: list[bool] = []

    def ask() -> None:
        # Each thread has its own cache object, as separate runners would.
        hits.append(FeatureCache(tmp_path).get_or_compute(FIELDS, compute)[1])

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert compute.calls == 1
    assert sorted(hits) == [False, True, True]


def test_a_lock_holder_that_stopped_does_not_hang_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, compute = FeatureCache(tmp_path, patience=0.6), Counting()
    key = cache.key(FIELDS)
    (tmp_path / key[:2]).mkdir()
    stopped = filelock.FileLock(tmp_path / key[:2] / f"{key}.lock")
    stopped.acquire()  # held by a process that was stopped (SIGSTOP) while computing
    (tmp_path / key[:2] / f"{key}.alive").write_text("node7 pid 4242\n")  # never touched again
    caplog.set_level(logging.INFO, logger="vtab.evaluation.features")
    started = time.monotonic()
    try:
        _, hit = cache.get_or_compute(FIELDS, compute)
    finally:
        stopped.release()
    assert not hit and compute.calls == 1
    assert time.monotonic() - started < 5  # not the hour a plain lock timeout would wait
    assert "waiting for node7 pid 4242" in caplog.text
    assert "node7 pid 4242 showed no sign of life" in caplog.text
    assert cache.load(key) is not None


def test_a_slow_holder_that_shows_life_is_waited_for(tmp_path: Path) -> None:
    compute = Counting(delay=1.5)  # longer than the patience: only its sign of life holds it
    hits: list[bool] = []

    def ask() -> None:
        hits.append(FeatureCache(tmp_path, patience=0.6).get_or_compute(FIELDS, compute)[1])

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert compute.calls == 1 and sorted(hits) == [False, True]


def test_extraction_matches_a_direct_forward(digits_root: Path) -> None:
    split = open_split(digits_root, "digits", "val200", key="data.eval_split")
    split = dataclasses.replace(split, entries=split.entries[:13])
    backbone = create_backbone(BackboneConfig(name="resnet18"))
    transform = TransformSpec(32)
    found = extract_features(backbone.model, split, transform, batch_size=5)  # uneven batches
    images = torch.stack([image for image, _, _ in ImageSplit(split, transform.build())])
    with torch.inference_mode():
        expected = backbone.model(images)
    assert found.features.dtype == torch.float32 and found.features.shape == (13, 512)
    torch.testing.assert_close(found.features, expected)
    assert found.labels.tolist() == split.labels and found.paths == split.paths
    fields = cache_fields({"name": "resnet18"}, transform, split, "fp32")
    assert fields["data"] == {"dataset": "digits", "split": "val200", "split_sha256": split.sha256}
    assert fields["transform"]["image_size"] == 32


def test_extraction_reuses_rows_of_donor_sets_and_forwards_the_rest(digits_root: Path) -> None:
    split = open_split(digits_root, "digits", "train800val200", key="data.train_split")
    split = split.subset([0, 1, 2, 800, 801])  # three train800 images, two val200 images
    backbone = create_backbone(BackboneConfig(name="resnet18"))
    transform = TransformSpec(32)
    asked: list[list[str]] = []

    def extract(part: Split) -> FeatureSet:
        asked.append(part.paths)
        found = extract_features(backbone.model, part, transform)
        found.meta = {"missing_keys": 0}
        return found

    direct = extract(split)
    donor = extract(split.subset([1, 0]))  # another split holding two of the images
    asked.clear()
    found = extract_reusing(split, [donor], extract)
    assert asked == [[split.paths[i] for i in (2, 3, 4)]]  # only the images the donor lacks
    assert found.meta == {"missing_keys": 0, "forwarded": 3, "reused": 2}
    assert found.paths == split.paths and torch.equal(found.labels, direct.labels)
    torch.testing.assert_close(found.features, direct.features)

    assert extract_reusing(split, [found], extract).meta["forwarded"] == 0
    assert len(asked) == 1  # nothing left to forward


def test_precision_auto_depends_on_device() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
