"""Feature extraction and the content-keyed feature cache."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import filelock
import numpy as np
import pytest
import torch

from vtab.errors import DataError
from vtab.evaluation import store
from vtab.evaluation.backbones import build_backbone, resolve_backbone, source_of
from vtab.evaluation.data import ImageSplit, Split, image_digests, open_split
from vtab.evaluation.features import (
    TransformSpec,
    cache_fields,
    extract_features,
    extract_reusing,
    resolve_precision,
)
from vtab.evaluation.schemas import BackboneConfig, LayerConfig
from vtab.evaluation.store import FeatureCache, FeatureSet

FIELDS = {"backbone": {"source": "test", "name": "toy", "weights_id": "random-seed0"},
          "data": {"dataset": "toy", "split": "train800", "split_sha256": "00"}}


class Counting:
    """A compute function that records its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, names: list[str]) -> dict[str, FeatureSet]:
        self.calls += 1
        time.sleep(self.delay)
        return {name: FeatureSet(torch.arange(12.0).view(4, 3), ["a", "b", "c", "d"],
                                 {"missing_keys": 2}, ["d" * 64, "e" * 64, "f" * 64, "0" * 64],
                                 ["1", "0", "1", "2"]) for name in names}


def one(cache: FeatureCache, compute: Counting) -> tuple[FeatureSet, bool]:
    """The cache's answer for a single entry (FIELDS)."""
    found, hits = cache.get_or_compute({"output": FIELDS}, compute)
    return found["output"], hits["output"]


def assert_same(a: FeatureSet, b: FeatureSet) -> None:
    assert torch.equal(a.features, b.features)
    assert (a.paths, a.meta, a.digests) == (b.paths, b.meta, b.digests)


def test_second_call_hits_without_computing(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    first, hit = one(cache, compute)
    assert not hit
    second, hit = one(cache, compute)
    assert hit and compute.calls == 1
    assert_same(first, second)
    key = cache.key(FIELDS)
    description = json.loads((tmp_path / key[:2] / f"{key}.json").read_text())
    assert description["shape"] == [4, 3] and description["fields"] == FIELDS
    # Readable by other tools in two lines: the rows memory-mapped, the manifest as a table.
    rows = np.load(tmp_path / key[:2] / f"{key}.npy", mmap_mode="r")
    with (tmp_path / key[:2] / f"{key}.csv").open() as manifest:
        lines = list(csv.DictReader(manifest))
    assert isinstance(rows, np.memmap) and rows.dtype == np.float32
    assert np.array_equal(rows, first.features.numpy())
    assert [line["image"] for line in lines] == ["a", "b", "c", "d"]
    assert lines[1] == {"row": "1", "image": "b", "sha256": "e" * 64, "split": "train800",
                        "target": "0"}


def test_key_depends_on_every_field() -> None:
    changed = {**FIELDS, "data": {**FIELDS["data"], "split_sha256": "01"}}
    assert FeatureCache.key(FIELDS) != FeatureCache.key(changed)
    assert FeatureCache.key(FIELDS) == FeatureCache.key(json.loads(json.dumps(FIELDS)))


def test_fp16_storage_halves_the_rows_and_trains_in_fp32(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    half = {**FIELDS, "storage": "fp16"}
    found, _ = cache.get_or_compute({"output": half}, compute)
    key = cache.key(half)
    assert key != cache.key(FIELDS)
    assert np.load(tmp_path / key[:2] / f"{key}.npy", mmap_mode="r").dtype == np.float16
    # What the job uses is what the store holds, on a miss as on a hit.
    assert found["output"].features.dtype == torch.float16
    assert found["output"].float().dtype == torch.float32
    assert torch.equal(found["output"].float(), torch.arange(12.0).view(4, 3))


@pytest.mark.parametrize(("damage", "part"), [
    ("flip_byte", ".npy"), ("truncate", ".npy"), ("drop_payload", ".npy"),
    ("flip_byte", ".csv"), ("drop_payload", ".csv")])
def test_damaged_entry_is_detected_and_recomputed(tmp_path: Path, damage: str, part: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    one(cache, compute)
    key = cache.key(FIELDS)
    payload = tmp_path / key[:2] / f"{key}{part}"
    data = bytearray(payload.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))
    elif damage == "truncate":
        payload.write_bytes(bytes(data[:100]))
    else:
        payload.unlink()
    store._verified.clear()  # as a new process would: a file checked here is not read again
    with caplog.at_level(logging.WARNING):
        again, hit = one(cache, compute)
    assert not hit and compute.calls == 2
    assert f"discarding {payload.with_suffix('.npy')}" in caplog.text
    assert_same(again, compute(["output"])["output"])
    assert cache.load(key) is not None  # rewritten whole


def test_missing_manifest_is_a_miss(tmp_path: Path) -> None:
    cache, compute = FeatureCache(tmp_path), Counting()
    one(cache, compute)
    key = cache.key(FIELDS)
    (tmp_path / key[:2] / f"{key}.json").unlink()
    assert cache.load(key) is None
    assert one(cache, compute)[1] is False and compute.calls == 2


def test_concurrent_requests_compute_once(tmp_path: Path) -> None:
    compute = Counting(delay=0.5)
    hits: list[bool] = []

    def ask() -> None:
        # Each thread has its own cache object, as separate runners would.
        hits.append(one(FeatureCache(tmp_path), compute)[1])

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
    caplog.set_level(logging.INFO, logger="vtab.evaluation.store")
    started = time.monotonic()
    try:
        _, hit = one(cache, compute)
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
        hits.append(one(FeatureCache(tmp_path, patience=0.6), compute)[1])

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
    spec = resolve_backbone(BackboneConfig(name="resnet18"))
    backbone = build_backbone(spec)
    transform = TransformSpec(32)
    layers = [LayerConfig(), LayerConfig(name="layer4", pool="avg"),
              LayerConfig(name="layer3", pool="avgpool2d", kernel_size=2)]
    found = extract_features(backbone.model, layers, source_of(spec), split, transform,
                             batch_size=5)  # uneven batches
    images = torch.stack([image for image, _, _ in ImageSplit(split, transform.build())])
    with torch.inference_mode():
        expected = backbone.model(images)
        # By hand: layer3's map [13, 256, 2, 2] through the modules up to it.
        model = backbone.model
        stem = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        layer3 = model.layer3(model.layer2(model.layer1(stem)))
    assert list(found) == ["output", "layer4:avg", "layer3:avgpool2s2p0"]
    output = found["output"]
    assert output.features.dtype == torch.float32 and output.features.shape == (13, 512)
    torch.testing.assert_close(output.features, expected)
    # ResNet's own pooling is the global average of layer4.
    torch.testing.assert_close(found["layer4:avg"].features, expected)
    torch.testing.assert_close(found["layer3:avgpool2s2p0"].features,
                               torch.nn.functional.avg_pool2d(layer3, 2).flatten(1))
    assert output.paths == split.paths
    fields = cache_fields({"name": "resnet18"}, transform, split, "fp32", layers[0])
    assert fields["data"] == {"dataset": "digits", "split": "val200", "split_sha256": split.sha256}
    assert fields["transform"]["image_size"] == 32 and fields["feature"] == "pooled"
    assert cache_fields({"name": "resnet18"}, transform, split, "fp32", layers[2])["feature"] == {
        "name": "layer3", "pool": "avgpool2d", "kernel_size": 2, "stride": None, "padding": 0}


def test_extraction_reuses_rows_of_donor_sets_and_forwards_the_rest(digits_root: Path) -> None:
    split = open_split(digits_root, "digits", "train800val200", key="data.train_split")
    split = split.subset([0, 1, 2, 800, 801])  # three train800 images, two val200 images
    spec = resolve_backbone(BackboneConfig(name="resnet18"))
    backbone = build_backbone(spec)
    transform = TransformSpec(32)
    layers = [LayerConfig(), LayerConfig(name="layer3", pool="avg")]
    labels = [layer.label() for layer in layers]
    asked: list[list[str]] = []

    def extract(part: Split) -> dict[str, FeatureSet]:
        asked.append(part.paths)
        found = extract_features(backbone.model, layers, source_of(spec), part, transform)
        for features in found.values():
            features.meta, features.digests = {"missing_keys": 0}, image_digests(part)
        return found

    direct = extract(split)
    donor = extract(split.subset([1, 0]))  # another split holding two of the images
    other = extract(split.subset([2]))  # a third holding a third image, of one layer only
    asked.clear()
    found = extract_reusing(split, labels, {"output": [donor["output"], other["output"]],
                                            "layer3:avg": [donor["layer3:avg"]]}, extract)
    # Only the images some layer lacks, once for both layers: image 2 is there for one only.
    assert asked == [[split.paths[i] for i in (2, 3, 4)]]
    for label in labels:
        assert found[label].meta == {"missing_keys": 0, "forwarded": 3, "reused": 2}
        assert found[label].paths == split.paths
        torch.testing.assert_close(found[label].features, direct[label].features)

    again = extract_reusing(split, labels, {label: [found[label]] for label in labels}, extract)
    assert again["output"].meta["forwarded"] == 0
    assert len(asked) == 1  # nothing left to forward


def test_precision_auto_depends_on_device() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"


def _small_vit() -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                              hidden_dim=16, mlp_dim=32)
    model.heads = torch.nn.Identity()
    return model.eval().requires_grad_(False)  # frozen, as build_backbone leaves a model


def test_vit_tokens_and_dinov2_last_blocks_by_hand() -> None:
    """cls, patch_mean and last_blocks against the encoder run block by block: DINOv2's
    create_linear_input concatenates the normed CLS token of each of the last n blocks, then
    (with avgpool) the mean of the last block's normed patch tokens."""
    from vtab.evaluation.backbones import _source
    from vtab.evaluation.extract import LayerExtractor

    model = _small_vit()
    images = torch.randn(3, 3, 32, 32)
    layers = [LayerConfig(name="last_blocks", blocks=2, pool="cls_patch_mean"),
              LayerConfig(name="encoder.layers.encoder_layer_1", pool="patch_mean"),
              LayerConfig(name="encoder.layers.encoder_layer_3", pool="cls"), LayerConfig()]
    with torch.inference_mode():
        found = LayerExtractor(model, layers, _source("torchvision"))(images)
        tokens = model._process_input(images)
        tokens = torch.cat([model.class_token.expand(3, -1, -1), tokens], dim=1)
        tokens = tokens + model.encoder.pos_embedding
        outputs = []
        for block in model.encoder.layers:
            tokens = block(tokens)
            outputs.append(tokens)
        normed = [model.encoder.ln(x) for x in outputs[-2:]]
        expected_last = torch.cat([normed[0][:, 0], normed[1][:, 0], normed[1][:, 1:].mean(1)], 1)
        output = model(images)
    torch.testing.assert_close(found["last2_cls_patch_mean"], expected_last)
    torch.testing.assert_close(found["encoder.layers.encoder_layer_1:patch_mean"],
                               outputs[1][:, 1:].mean(1))
    torch.testing.assert_close(found["encoder.layers.encoder_layer_3:cls"], outputs[3][:, 0])
    torch.testing.assert_close(found["output"], output)  # torchvision: the normed CLS token
    torch.testing.assert_close(found["output"], model.encoder.ln(outputs[3])[:, 0])


def test_timm_layers_through_timms_own_extractor() -> None:
    timm = pytest.importorskip("timm", reason="timm is an extra: pip install 'vtab[timm]'")
    from vtab.evaluation.backbones import _source
    from vtab.evaluation.extract import check_layers

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).eval()
    sizes = check_layers(model, [LayerConfig(), LayerConfig(name="blocks.5", pool="cls"),
                                 LayerConfig(name="last_blocks", blocks=4, pool="cls")],
                         _source("timm"), 32)
    assert sizes == {"output": 192, "blocks.5:cls": 192, "last4_cls": 4 * 192}


def test_timm_register_tokens_are_left_out_and_a_missing_cls_is_refused() -> None:
    timm = pytest.importorskip("timm", reason="timm is an extra: pip install 'vtab[timm]'")
    from vtab.errors import ConfigError
    from vtab.evaluation.backbones import _source
    from vtab.evaluation.extract import LayerExtractor, check_layers

    source = _source("timm")
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=28,
                              depth=2).eval().requires_grad_(False)
    assert model.num_prefix_tokens == 5  # CLS and 4 registers
    images = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        found = LayerExtractor(model, [LayerConfig(name="blocks.1", pool="patch_mean"),
                                       LayerConfig(name="last_blocks", blocks=1,
                                                   pool="cls_patch_mean")], source)(images)
        tokens = model.norm(model.blocks(model._pos_embed(model.patch_embed(images))))
    torch.testing.assert_close(found["last1_cls_patch_mean"],
                               torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))
    assert found["blocks.1:patch_mean"].shape == (2, 384)
    gap = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32,
                            class_token=False, global_pool="avg").eval()
    with pytest.raises(ConfigError, match="needs a CLS token; this model has none"):
        check_layers(gap, [LayerConfig(name="blocks.1", pool="cls")], source, 32)


def test_image_names_with_unusual_characters_survive_the_manifest(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    paths = ["a\x0cb.png", "c,d.png", 'e"f.png', "g\u2028h.png"]
    features = FeatureSet(torch.ones(4, 2), paths, {}, ["0" * 64] * 4, ["1", "2", "3", "4"])
    cache.store("k" * 64, {"data": {"split": "s"}}, features)
    assert cache.load("k" * 64).paths == paths
    plain = FeatureSet(torch.ones(2, 2), ["a\x0cb.png", "c\u2028d.png"], {}, ["0" * 64] * 2,
                       ["1", "2"])  # no quote anywhere: the fast path
    cache.store("m" * 64, {"data": {"split": "s"}}, plain)
    assert cache.load("m" * 64).paths == plain.paths


def test_fp16_refuses_features_beyond_its_range(tmp_path: Path) -> None:
    features = FeatureSet(torch.tensor([[1e6, 0.0]]), ["a.png"], {}, ["0" * 64], ["1"])
    with pytest.raises(DataError, match="exceed the range of fp16"):
        FeatureCache(tmp_path).store("k" * 64, {"storage": "fp16"}, features)
