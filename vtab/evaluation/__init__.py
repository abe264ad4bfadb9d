"""Frozen-backbone evaluation: VTAB-1K data, backbones, a feature cache, linear heads, metrics.

`vtab.evaluation.probe.run_linear_probe` ties them together. Nothing is re-exported here so that
importing a light module (the digits writer, the data checker) does not import torchvision.
"""
