"""`eqakit config CONFIG.yaml [key=value ...]`: validate a config and print what a run would use.

Catches every mistake a run would meet before its first heavy step, and shows the resolved values
(defaults filled in, overrides applied) as YAML, e.g. to compare with a LLaMA-Factory run. Beyond
the keys it runs the verb's own checks (its ``preflight``): the model's config and processor, each
adapter's fit, every dataset row and its media, the output directory's state. So a config it calls
valid starts; ``--keys-only`` checks the keys alone (no file is opened). ``--memory`` adds an
estimate of the run's peak accelerator memory (`eqakit.memory`), from what the checks planned.

    eqakit config configs/training_args.yaml learning_rate=1e-4
    eqakit config configs/merge_openeqa.yaml --keys     # list every key with its meaning
    eqakit config configs/training_args.yaml --memory --device cuda   # peak GPU memory
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import yaml

from eqakit.config import Config
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
    parser.add_argument(
        "--keys-only",
        action="store_true",
        help="check the keys only, not the model, datasets and directories they name",
    )
    parser.add_argument(
        "--memory", action="store_true", help="estimate the run's peak accelerator memory (last line)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "mps", "cpu"),
        help="the accelerator --memory estimates for, e.g. the GPU a run is planned on (default: this machine's)",
    )
    args = parser.parse_args(argv)
    if args.memory and args.keys_only:
        parser.error(
            "--memory needs the checks --keys-only leaves out (the model's shapes, the planned samples)"
        )
    if args.device and not args.memory:
        parser.error("--device names the accelerator --memory estimates for: add --memory")
    kind = args.kind or infer_kind({**read_yaml(args.config), **parse_overrides(args.overrides)})
    if args.memory and kind == "export":
        parser.error(
            "--memory estimates training, predict and serving; `eqakit export` needs about 1.25x the merged model's size"
        )
    if args.keys:
        print(describe_keys(kind))
        return 0
    config = load_config(kind, args.config, args.overrides)
    resolved = {k: v for k, v in config.to_dict().items() if k in config.user_keys}
    verbs = {"train": "eqakit train", "export": "eqakit export", "infer": "eqakit api / chat / webui"}
    if args.keys_only:
        print(f"# {args.config}: keys valid for `{verbs[kind]}` (files not checked)")
    else:
        started = time.perf_counter()
        found = preflight(kind, config)
        print(
            f"# {args.config}: valid for `{verbs[kind]}`; checked in {time.perf_counter() - started:.1f} s: "
            f"{describe(kind, config, found)}"
        )
    print(yaml.safe_dump(resolved, sort_keys=True, allow_unicode=True), end="")
    if args.memory:
        from eqakit.memory import estimate
        from eqakit.model.load import pick_device

        device = pick_device(args.device) if args.device else None
        print(estimate(kind, config, found, device).report())
    return 0


def preflight(kind: str, config: Config) -> Any:
    """Run the checks the verb for ``kind`` runs before its first heavy step; returns what they found."""
    if kind == "export":
        from eqakit.export import preflight as export_preflight

        return export_preflight(config)
    if kind == "train" and config.training.do_predict:
        from eqakit.evaluate.predict import preflight as predict_preflight

        return predict_preflight(config)
    if kind == "train":
        from eqakit.train.sft import preflight as train_preflight

        return train_preflight(config)
    from eqakit.model.load import check_model, load_processor

    check_model(config.model)
    return load_processor(config.model)


def describe(kind: str, config: Config, found: Any) -> str:
    """What `preflight` found, in words."""
    if kind == "train" and config.training.do_predict:
        return f"{len(found.samples)} samples of {config.data.eval_dataset!r} to predict"
    if kind != "infer":
        return found.describe()
    adapters = len(config.model.adapter_paths)
    return f"{config.model.model_name_or_path} and its processor" + (
        f", {adapters} adapter(s) that fit it" if adapters else ""
    )
