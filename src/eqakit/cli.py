"""The `eqakit` command: a small table from verb to the function that runs it.

Each verb lives in its own module and exposes ``cli(argv: list[str]) -> int``; modules are imported
only when their verb is used, so `eqakit synth` does not pay for importing torch.

    eqakit prepare openeqa --questions open-eqa-v0.json --frames frames/ --output-dir data/
    eqakit train configs/training_args.yaml learning_rate=1e-4
"""

from __future__ import annotations

import importlib
import os
import sys

from eqakit import __version__
from eqakit.errors import EqakitError
from eqakit.fsutil import disk_failure

# verb -> (module, one-line help). The module's `cli(argv)` parses the rest of the command line.
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("eqakit.data.prepare", "build a LLaMA-Factory dataset directory from OpenEQA"),
    "train": (
        "eqakit.train.sft",
        "LoRA fine-tuning (do_train) or prediction (do_predict) from a YAML config",
    ),
    "export": ("eqakit.export", "merge LoRA adapters into the base model and write it"),
    "api": ("eqakit.serve.api", "OpenAI-compatible API server"),
    "webui": ("eqakit.serve.webui", "web chat UI"),
    "chat": ("eqakit.serve.chat", "terminal chat"),
    "judge": ("eqakit.evaluate.llm_match", "OpenEQA LLM-Match scoring with an OpenAI-compatible judge"),
    "config": ("eqakit.config.check", "validate a YAML config and print the resolved settings"),
    "tiny-model": (
        "eqakit.model.tiny",
        "build a tiny random Qwen-VL model (Qwen3-VL, its MoE, Qwen2.5-VL) for tests and the demo",
    ),
    "demo": ("eqakit.demo.pipeline", "run the whole pipeline on the tiny model and synthetic data"),
    "synth": ("eqakit.demo.synth", "generate synthetic data in OpenEQA's official layout"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        f"eqakit {__version__}: fine-tune, evaluate and serve Qwen-VL models on embodied QA",
        "",
        "usage: eqakit VERB ...",
        "",
    ]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "Run `eqakit VERB --help` for a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"eqakit {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"eqakit: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = VERBS[verb][0]
    module = importlib.import_module(module_name)
    try:
        return int(module.cli(rest) or 0)
    except EqakitError as exc:
        print(f"eqakit {verb}: {exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"eqakit {verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `eqakit config ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except Exception as exc:  # a write the disk refused, where the verb does not say more
        reason = disk_failure(exc)
        if reason is None:
            raise
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        print(
            f"eqakit {verb}: cannot write: {where}{reason}; free space on its disk and run again",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
