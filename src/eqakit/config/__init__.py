"""Typed configuration: LLaMA-Factory's YAML keys, validated up front."""

from eqakit.config.args import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
from eqakit.config.load import Config, describe_keys, load_config, parse_overrides, read_yaml

__all__ = [
    "Config",
    "DataArguments",
    "FinetuningArguments",
    "GeneratingArguments",
    "ModelArguments",
    "describe_keys",
    "load_config",
    "parse_overrides",
    "read_yaml",
]
