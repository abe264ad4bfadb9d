"""What only a CUDA device can check: extraction there (bf16, channels_last, pinned memory,
DataLoader workers) against the CPU's, and heads trained in one pass there. Skipped without
CUDA; run by bench/gpu.sh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_evaluation import probe_config
from vtab.evaluation import probe
from vtab.evaluation.backbones import build_backbone, resolve_backbone, source_of
from vtab.evaluation.data import open_split
from vtab.evaluation.features import TransformSpec, extract_features, forward_setup
from vtab.evaluation.schemas import BackboneConfig, LayerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _features(digits_root: Path, device: str, precision: str,
              num_workers: int = 0) -> torch.Tensor:
    spec = resolve_backbone(BackboneConfig(name="resnet18"))
    model = build_backbone(spec).model
    split = open_split(digits_root, "digits", "val200", key="data.eval_split")
    found = extract_features(model, [LayerConfig(), LayerConfig(name="layer3", pool="avg")],
                             source_of(spec), split, TransformSpec(32), batch_size=64,
                             num_workers=num_workers, device=device, precision=precision)
    return torch.cat([found[label].features for label in ("output", "layer3:avg")], dim=1)


def test_the_gpu_forward_is_channels_last_and_bf16_by_default() -> None:
    setup = forward_setup("cuda:0", "auto")
    assert setup.memory_format == torch.channels_last and setup.bf16
    assert forward_setup("cpu", "auto").bf16 is False


def test_cuda_fp32_extraction_matches_the_cpu(digits_root: Path) -> None:
    cpu = _features(digits_root, "cpu", "fp32")
    gpu = _features(digits_root, "cuda:0", "fp32", num_workers=2)  # pinned, from workers
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    # cuDNN picks other algorithms (TF32 is off by default for convolutions in fp32 here).
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_cuda_bf16_extraction_is_close_to_fp32(digits_root: Path) -> None:
    cpu = _features(digits_root, "cpu", "fp32")
    bf16 = _features(digits_root, "cuda:0", "bf16")
    cosine = torch.nn.functional.cosine_similarity(bf16, cpu, dim=1)
    assert cosine.min() > 0.99  # bf16 keeps 8 bits of mantissa: rows point the same way


def test_heads_trained_in_one_pass_on_the_gpu_equal_heads_alone(digits_root: Path,
                                                               tmp_path: Path) -> None:
    configs = [probe_config(digits_root, **{"optim.lr": lr, "optim.epochs": 3,
                                            "features.precision": "fp32"})
               for lr in (0.1, 0.01, 0.001)]
    cache = tmp_path / "cache"
    together = probe.run_linear_probes(configs, cache_dir=cache, device="cuda:0",
                                       progress=False)
    for config, batched in zip(configs, together, strict=True):
        alone = probe.run_linear_probe(config, cache_dir=cache, device="cuda:0", progress=False)
        assert batched["result"] == pytest.approx(alone["result"], abs=1e-4)
