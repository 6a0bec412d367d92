"""`eqakit config CONFIG.yaml [key=value ...]`: validate a config and print what a run would use.

Catches every config mistake before a long job starts, and shows the resolved values (defaults
filled in, overrides applied) as YAML, e.g. to compare with a LLaMA-Factory run:

    eqakit config configs/training_args.yaml learning_rate=1e-4
    eqakit config configs/merge_openeqa.yaml --keys     # list every key with its meaning
"""

from __future__ import annotations

import argparse

import yaml

from eqakit.config.load import describe_keys, infer_kind, load_config, parse_overrides, read_yaml


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqakit config", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="LLaMA-Factory-style YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the file's")
    parser.add_argument(
        "--kind",
        choices=("train", "infer", "export"),
        help="which verb the file is for (default: guessed from do_train/do_predict/export_dir)",
    )
    parser.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    args = parser.parse_args(argv)
    kind = args.kind or infer_kind({**read_yaml(args.config), **parse_overrides(args.overrides)})
    if args.keys:
        print(describe_keys(kind))
        return 0
    config = load_config(kind, args.config, args.overrides)
    resolved = {k: v for k, v in config.to_dict().items() if k in config.user_keys}
    verbs = {"train": "eqakit train", "export": "eqakit export", "infer": "eqakit api / chat / webui"}
    print(f"# {args.config}: valid for `{verbs[kind]}`")
    print(yaml.safe_dump(resolved, sort_keys=True, allow_unicode=True), end="")
    return 0
