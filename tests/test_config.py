"""Config parsing: the seed's four YAML files, overrides, and every kind of config error."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import yaml

from eqakit.cli import main
from eqakit.config import load_config
from eqakit.errors import ConfigError, EqakitError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEED = Path(__file__).resolve().parents[2] / "shared" / "seed"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL_TRAIN = """\
model_name_or_path: some/model
template: qwen3_vl_nothink
stage: sft
do_train: true
finetuning_type: lora
dataset: open_eqa_train_val
output_dir: {out}
"""


def test_seed_training_args_have_the_seed_meanings() -> None:
    cfg = load_config("train", CONFIGS / "training_args.yaml")
    assert cfg.training.learning_rate == 5e-5
    assert cfg.training.num_train_epochs == 3.0
    assert cfg.training.per_device_train_batch_size == 2
    assert cfg.training.gradient_accumulation_steps == 8
    assert cfg.training.eval_strategy.value == "steps" and cfg.training.eval_steps == 100
    assert cfg.training.save_steps == 10 and cfg.training.logging_steps == 5
    assert cfg.training.lr_scheduler_type.value == "cosine"
    assert cfg.training.include_num_input_tokens_seen in (True, "all", "non_padding")
    assert (
        cfg.finetuning.lora_rank == 8 and cfg.finetuning.lora_alpha == 16 and cfg.finetuning.lora_dropout == 0
    )
    assert cfg.finetuning.lora_target == "all" and cfg.finetuning.plot_loss
    assert cfg.finetuning.freeze_vision_tower and cfg.finetuning.freeze_multi_modal_projector
    assert cfg.data.cutoff_len == 2048 and cfg.data.val_size == 0.125 and cfg.data.max_samples == 99999
    assert cfg.data.template == "qwen3_vl_nothink" and cfg.data.enable_thinking is False
    assert cfg.model.image_max_pixels == 589824 and cfg.model.image_min_pixels == 1024


def test_seed_eval_merge_infer_configs_parse() -> None:
    ev = load_config("train", CONFIGS / "eval_args.yaml")
    assert ev.training.do_predict and ev.training.predict_with_generate
    assert (
        ev.generating.temperature == 0.2
        and ev.generating.top_p == 1.0
        and ev.generating.max_new_tokens == 128
    )
    assert ev.data.eval_dataset == "open_eqa_test" and ev.training.per_device_eval_batch_size == 2
    merge = load_config("export", CONFIGS / "merge_openeqa.yaml")
    assert merge.model.export_size == 2.0 and merge.model.export_device == "auto"
    assert merge.model.export_legacy_format is False
    infer = load_config("infer", CONFIGS / "infer_openeqa.yaml")
    assert infer.data.template == "qwen3_vl_nothink" and infer.model.trust_remote_code


@pytest.mark.skipif(not SEED.is_dir(), reason="shared/seed not present")
def test_shipped_configs_hold_exactly_the_seed_keys() -> None:
    """configs/ differ from the tutorial's files only in paths: the same keys, the same non-path values."""
    import re

    import yaml

    text = next(SEED.glob("*.txt")).read_text(encoding="utf-8")
    seed_train = dict(
        re.findall(r"^([a-z_0-9]+): (.+)$", text.split("bf16: false", 1)[1].split("参数详细")[0], re.M)
    )
    ours = yaml.safe_load((CONFIGS / "training_args.yaml").read_text())
    assert set(seed_train) | {"bf16"} == set(ours)
    for key, value in seed_train.items():
        if key not in ("model_name_or_path", "output_dir", "dataset_dir"):
            assert yaml.safe_load(value) == ours[key], key


def test_override_beats_file_and_strings_are_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o") + "learning_rate: 5e-5\n")
    cfg = load_config("train", path, ["learning_rate=1e-4", "lora_rank=16", "bf16=false"])
    assert cfg.training.learning_rate == 1e-4  # 5e-5 in YAML is a string for PyYAML: still a float here
    assert cfg.finetuning.lora_rank == 16
    assert cfg.finetuning.lora_alpha is None  # default stays LLaMA-Factory's (2 x rank applied by training)
    assert load_config("train", path).training.learning_rate == 5e-5


def test_adapter_paths_split_on_commas(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name_or_path: m\ntemplate: qwen3_vl\nadapter_name_or_path: a, b ,c\n")
    assert load_config("infer", path).model.adapter_paths == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora_rnak=3", "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
        ("use_galore=true", "'use_galore' is a LLaMA-Factory option eqakit does not support"),
        (
            "pissa_init=true",
            "'pissa_init' is a LLaMA-Factory option eqakit does not support (PiSSA rewrites the base weights",
        ),
        ("lora_rank=-1", "key 'lora_rank': -1 is out of range (must be >= 1)"),
        ("lora_rank=eight", "key 'lora_rank': 'eight' must be an integer"),
        ("lora_dropout=1.5", "key 'lora_dropout': 1.5 is out of range (must be <= 1.0)"),
        ("learning_rate=0", "key 'learning_rate': 0 is out of range (must be > 0.0)"),
        ("bf16=maybe", "key 'bf16': 'maybe' must be true or false"),
        (
            "flash_attn=fast",
            "key 'flash_attn': 'fast' is not allowed; choose one of: auto, disabled, sdpa, fa2",
        ),
        (
            "template=llama3",
            "key 'template': 'llama3' is not allowed; choose one of: qwen3_vl_nothink, qwen3_vl",
        ),
        ("stage=ppo", "key 'stage': 'ppo' is not allowed; choose one of: sft, dpo"),
        (
            "finetuning_type=oft",
            "key 'finetuning_type': 'oft' is not allowed; choose one of: lora, full, freeze",
        ),
        (
            "lr_scheduler_type=cosine_wrong",
            "key 'lr_scheduler_type': 'cosine_wrong' is not allowed; choose one of: linear",
        ),
        ("quantization_bit=3", "key 'quantization_bit': 3 is not allowed; choose one of: 4, 8"),
        ("packing=true", "packing: true is not supported by eqakit"),
        (
            "per_device_train_batch_size=0",
            "key 'per_device_train_batch_size': 0 is out of range (must be >= 1)",
        ),
    ],
)
def test_config_errors_name_key_value_and_fix(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o"))
    with pytest.raises(ConfigError) as err:
        load_config("train", path, [override])
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o") + "lora_rnak: 3\nuse_galore: true\nlora_rank: 0\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config("train", path)
    message = str(err.value)
    assert "lora_rnak" in message and "use_galore" in message and "'lora_rank': 0" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("template: qwen3_vl\nstage: sft\ndo_train: true\ndataset: d\n", "model_name_or_path is required"),
        ("model_name_or_path: m\ntemplate: qwen3_vl\n", "set do_train: true"),
        ("model_name_or_path: m\ntemplate: qwen3_vl\ndo_train: true\n", "do_train needs dataset"),
        (
            "model_name_or_path: m\ntemplate: qwen3_vl\ndo_predict: true\neval_dataset: t\n",
            "predict_with_generate: true",
        ),
        (
            "model_name_or_path: m\ntemplate: qwen3_vl\ndo_predict: true\npredict_with_generate: true\n",
            "needs eval_dataset",
        ),
        (
            "model_name_or_path: m\ntemplate: qwen3_vl\ndo_train: true\ndataset: d\nbf16: true\nfp16: true\n",
            "choose one",
        ),
        ("model_name_or_path: m\ndo_train: true\ndataset: d\n", "template is required"),
        (
            "model_name_or_path: m\ntemplate: qwen3_vl\ndo_train: true\ndataset: d\n"
            "image_min_pixels: 10000\nimage_max_pixels: 100\n",
            "image_min_pixels (10000) is larger",
        ),
    ],
)
def test_contradictory_settings(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config("train", write(tmp_path, text + f"output_dir: {tmp_path / 'o'}\n"))


def test_training_key_in_an_inference_config_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name_or_path: m\ntemplate: qwen3_vl\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match="'learning_rate' is a training key"):
        load_config("infer", path)


def test_export_needs_export_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export_dir is required"):
        load_config("export", write(tmp_path, "model_name_or_path: m\ntemplate: qwen3_vl\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [unclosed\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config("infer", write(tmp_path, text))


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("infer", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("infer", CONFIGS / "infer_openeqa.yaml", ["lora_rank"])


def test_cli_prints_one_message_without_traceback_and_exits_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o"))
    assert main(["config", str(path), "lora_rnak=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora_rnak' (did you mean 'lora_rank'?)" in err
    assert "Traceback" not in err


def test_cli_prints_resolved_config(capsys) -> None:
    assert main(["config", str(CONFIGS / "eval_args.yaml"), "temperature=0", "--keys-only"]) == 0
    out = capsys.readouterr().out
    assert (
        "keys valid for `eqakit train`" in out
        and "temperature: 0.0" in out
        and "eval_dataset: open_eqa_test" in out
    )


def test_config_runs_what_each_verb_checks_before_its_first_heavy_step(
    tiny_model_dir: Path, toy_dataset: Path, tmp_path: Path, capsys
) -> None:
    """`eqakit config` called configs valid that `eqakit train` refused seconds later: a model path
    that does not exist, a dataset not registered, a non-empty output_dir, a bad row. It now runs the
    verb's own preflight, so each is the message the verb gives; a valid config says what it found."""
    from eqakit.train.sft import preflight

    keys = {
        "model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "toy", "dataset_dir": str(toy_dataset), "template": "qwen3_vl_nothink",
        "output_dir": str(tmp_path / "run"), "report_to": "none",
    }  # fmt: skip
    path = write(tmp_path, yaml.safe_dump(keys))
    assert main(["config", str(path)]) == 0
    assert "valid for `eqakit train`; checked in" in capsys.readouterr().out

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("someone else's")
    rows = (toy_dataset / "toy.jsonl").read_text().splitlines()
    (toy_dataset / "bad.jsonl").write_text(rows[0].replace("<image><image>", "<image>") + "\n")
    info = json.loads((toy_dataset / "dataset_info.json").read_text())
    (toy_dataset / "dataset_info.json").write_text(
        json.dumps({**info, "bad": {**info["toy"], "file_name": "bad.jsonl"}})
    )
    for override, needle in [
        (f"model_name_or_path={tmp_path / 'nowhere'}", "does not exist"),
        ("dataset=toys", "dataset 'toys' is not registered"),
        ("dataset=bad", "bad.jsonl:1"),
        ("output_dir=" + str(tmp_path / "used"), "exists and is not empty"),
        (f"adapter_name_or_path={tmp_path}", "adapter_config.json not found"),
    ]:
        config = load_config("train", path, [override])
        with pytest.raises(EqakitError) as refused:
            preflight(config)
        assert needle in str(refused.value)
        assert main(["config", str(path), override]) != 0
        assert str(refused.value) in capsys.readouterr().err  # the message the verb gives, at once
    assert main(["config", str(path), f"output_dir={tmp_path / 'used'}", "--keys-only"]) == 0


def test_shipped_deepspeed_configs() -> None:
    import json

    for stage in (2, 3):
        ds = json.loads((CONFIGS / f"ds_z{stage}_config.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == "auto"


def test_unquoted_no_means_the_strategy_no(tmp_path: Path) -> None:
    """PyYAML reads `save_strategy: no` as false; it still means the strategy "no"."""
    path = write(
        tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o") + "save_strategy: no\neval_strategy: no\n"
    )
    cfg = load_config("train", path, ["logging_strategy=no"])
    assert cfg.training.save_strategy.value == "no" and cfg.training.eval_strategy.value == "no"
    assert cfg.training.logging_strategy.value == "no"


def test_vllm_keys_take_llama_factorys_meanings_and_contradictions_are_named(tmp_path: Path) -> None:
    base = "model_name_or_path: m\ntemplate: qwen3_vl\ninfer_backend: vllm\n"
    cfg = load_config(
        "infer", write(tmp_path, base), ['vllm_config={"max_num_seqs": 4}', "vllm_gpu_util=0.5"]
    )
    assert cfg.model.vllm_config == {"max_num_seqs": 4} and cfg.model.vllm_gpu_util == 0.5
    assert (cfg.model.vllm_maxlen, cfg.model.vllm_max_lora_rank, cfg.model.vllm_enforce_eager) == (
        4096,
        32,
        False,
    )
    with pytest.raises(ConfigError, match=r"vllm_maxlen \(2048\) must exceed cutoff_len \(2048\)"):
        load_config("infer", write(tmp_path, base + "vllm_maxlen: 2048\n"))
    with pytest.raises(ConfigError, match="quantization_bit loads with bitsandbytes"):
        load_config("infer", write(tmp_path, base + "quantization_bit: 4\n"))
    with pytest.raises(ConfigError, match="vllm_gpu_util"):
        load_config("infer", write(tmp_path, base + "vllm_gpu_util: 1.5\n"))
    with pytest.raises(ConfigError, match="api_max_batch_tokens budgets the transformers engine"):
        load_config("infer", write(tmp_path, base + "api_max_batch_tokens: 4096\n"))
    with pytest.raises(ConfigError, match="vLLM schedules continuously and has no window"):
        load_config("api", write(tmp_path, base + "api_batch_window_ms: 5\n"))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            ["overwrite_cache=true"],
            "'overwrite_cache' is a LLaMA-Factory option eqakit does not support (eqakit keeps no cache",
        ),
        (
            ["max_length=2048"],
            "'max_length' is a LLaMA-Factory option eqakit does not support (LLaMA-Factory",
        ),
        (["length_penalty=1.0"], "'length_penalty' is a LLaMA-Factory option eqakit does not support (it"),
        (["compute_accuracy=true"], "compute_accuracy reports accuracy on the evaluation set: set val_size"),
        (["freeze_language_model=true"], "leaves LoRA no layer to adapt"),
        (
            ["freeze_language_model=true", "freeze_multi_modal_projector=false"],
            "set freeze_vision_tower: false",
        ),
        (
            ["freeze_language_model=true", "freeze_vision_tower=false", "lora_target=q_proj"],
            "lora_target 'q_proj' names language-model layers",
        ),
        (
            ["disable_gradient_checkpointing=true", "gradient_checkpointing=true"],
            "gradient_checkpointing: true and disable_gradient_checkpointing: true contradict",
        ),
        (
            ["disable_gradient_checkpointing=true", "use_reentrant_gc=false"],
            "use_reentrant_gc has no effect with disable_gradient_checkpointing: true",
        ),
        (["preprocessing_batch_size=10"], "set preprocessing_num_workers to 2 or more"),
        (["finetuning_type=full", "lora_rank=16"], "lora_rank applies to finetuning_type: lora, not full"),
        (["finetuning_type=freeze", "use_rslora=true"], "use_rslora applies to finetuning_type: lora"),
        (
            ["finetuning_type=full", "quantization_bit=4"],
            "quantization_bit trains with finetuning_type: lora only",
        ),
        (
            ["freeze_trainable_layers=4"],
            "freeze_trainable_layers applies to finetuning_type: freeze, not lora",
        ),
        (
            ["finetuning_type=full", "adapter_name_or_path=x"],
            "adapter_name_or_path works with finetuning_type: lora only",
        ),
        (
            ["finetuning_type=full", "freeze_language_model=true"],
            "freeze_multi_modal_projector and freeze_language_model all true trains nothing",
        ),
        (
            ["finetuning_type=freeze", "freeze_trainable_layers=0"],
            "freeze_trainable_layers: 0 trains no layer",
        ),
        (["pref_beta=0.2"], "pref_beta applies to stage: dpo, not sft: remove it"),
        (
            ["stage=dpo", "pref_loss=orpo", "dpo_label_smoothing=0.1"],
            "dpo_label_smoothing applies to pref_loss: sigmoid",
        ),
        (["stage=dpo", "simpo_gamma=1.0"], "simpo_gamma applies to pref_loss: simpo, not sigmoid"),
        (
            ["stage=dpo", "pref_loss=ipo"],
            "key 'pref_loss': 'ipo' is not allowed; choose one of: sigmoid, orpo, simpo",
        ),
        (["stage=dpo", "train_on_prompt=true"], "train_on_prompt has no effect with stage: dpo"),
        (
            ["pref_bco_weight=0.5"],
            "'pref_bco_weight' is a LLaMA-Factory option eqakit does not support (eqakit's DPO",
        ),
        (
            ["preprocessing_batch_size=10", "preprocessing_num_workers=1"],
            "set preprocessing_num_workers to 2 or more",
        ),
    ],
)
def test_keys_without_an_effect_here_are_refused_by_name(
    tmp_path: Path, settings: list[str], expected: str
) -> None:
    """No key is accepted and ignored: each either has LLaMA-Factory's effect or is refused, saying why."""
    path = write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o"))
    with pytest.raises(ConfigError) as err:
        load_config("train", path, settings)
    assert expected in str(err.value)


def test_compute_accuracy_is_refused_with_predict_as_in_llama_factory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remove compute_accuracy"):
        load_config("train", CONFIGS / "eval_args.yaml", ["compute_accuracy=true"])


def test_llama_factory_training_keys_with_effect_are_accepted(tmp_path: Path) -> None:
    """The values these keys take (their effects are tested in test_train.py and test_train_speed.py)."""
    path = write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "o"))
    default = load_config("train", path)
    assert not default.finetuning.disable_gradient_checkpointing  # checkpointing on, as in LLaMA-Factory
    assert default.finetuning.use_reentrant_gc and not default.training.gradient_checkpointing
    cfg = load_config(
        "train",
        path,
        [
            "compute_accuracy=true",
            "val_size=0.1",
            "freeze_language_model=true",
            "freeze_vision_tower=false",
            "disable_gradient_checkpointing=true",
            "preprocessing_num_workers=4",
            "preprocessing_batch_size=100",
        ],
    )
    f, d = cfg.finetuning, cfg.data
    assert f.compute_accuracy and f.freeze_language_model and f.disable_gradient_checkpointing
    assert (d.preprocessing_num_workers, d.preprocessing_batch_size) == (4, 100)
    off = load_config("train", path, ["use_reentrant_gc=false", "freeze_multi_modal_projector=false"])
    assert not off.finetuning.use_reentrant_gc


def test_an_absent_template_is_the_checkpoints_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Without `template`, a local checkpoint's chat template chooses it: Qwen3-VL-Instruct's generation
    prompt gives qwen3_vl_nothink, a Thinking model's (which opens <think>) qwen3_vl; a set one wins."""
    import shutil

    keys = [
        f"model_name_or_path={tiny_model_dir}",
        "do_train=true",
        "dataset=d",
        f"output_dir={tmp_path / 'o'}",
    ]
    assert load_config("train", None, keys).data.template == "qwen3_vl_nothink"
    thinking = tmp_path / "thinking"
    shutil.copytree(tiny_model_dir, thinking)
    jinja = (thinking / "chat_template.jinja").read_text()
    (thinking / "chat_template.jinja").write_text(
        jinja.replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant\\n<think>\\n' }}")
    )
    keys[0] = f"model_name_or_path={thinking}"
    assert load_config("train", None, keys).data.template == "qwen3_vl"
    assert (
        load_config("train", None, [*keys, "template=qwen3_vl_nothink"]).data.template == "qwen3_vl_nothink"
    )
    (thinking / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="template is required"):
        load_config("train", None, keys)


@pytest.mark.parametrize(
    ("deepspeed", "expected"),
    [
        (None, r"deepspeed': .*missing\.json not found"),
        ('{"zero_optimization": {"stage": 3', r"deepspeed': .*ds\.json is not a readable JSON file"),
        ('{"zero_optimization": {"stage": 4}}', r"zero_optimization.stage 4 is not a ZeRO stage"),
        (
            '{"zero_optimization": {"stage": 2}}',
            r"DeepSpeed is not installed: pip install 'eqakit\[deepspeed\]'",
        ),
    ],
)
def test_deepspeed_files_are_checked_before_anything_runs(
    tmp_path: Path, monkeypatch, deepspeed: str | None, expected: str
) -> None:
    """A DeepSpeed JSON that is missing or does not parse, an unknown ZeRO stage and DeepSpeed not
    installed (hidden from the import system here) are refused by name, never a traceback."""
    import importlib.util

    if "not installed" in expected:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
        )
    path = tmp_path / ("missing.json" if deepspeed is None else "ds.json")
    if deepspeed is not None:
        path.write_text(deepspeed)
    with pytest.raises(ConfigError, match=expected):
        load_config(
            "train", write(tmp_path, MINIMAL_TRAIN.format(out=tmp_path / "out") + f"deepspeed: {path}\n")
        )


def test_fsdp_on_a_machine_without_gpus_is_refused(tmp_path: Path) -> None:
    """On the CPU accelerate turns fsdp into plain DDP without a word: refused by name instead."""
    text = MINIMAL_TRAIN.format(out=tmp_path / "out") + "fsdp: full_shard\nuse_cpu: true\n"
    with pytest.raises(
        ConfigError, match=r"'fsdp': 'full_shard' needs GPUs: .*silently trains with plain DDP"
    ):
        load_config("train", write(tmp_path, text))


# LLaMA-Factory 0.9.5's examples for Qwen3-VL (examples/train_lora/qwen3vl_lora_sft.yaml,
# inference/qwen3vl.yaml, merge_lora/qwen3vl_lora_sft.yaml), their keys and values as written there;
# only the paths are ours.
LF_LORA_SFT = {
    "model_name_or_path": "Qwen/Qwen3-VL-4B-Instruct", "image_max_pixels": 262144, "video_max_pixels": 16384,
    "trust_remote_code": True, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8,
    "lora_target": "all", "dataset": "mllm_demo,identity,alpaca_en_demo", "template": "qwen3_vl_nothink",
    "cutoff_len": 2048, "max_samples": 1000, "preprocessing_num_workers": 16, "dataloader_num_workers": 4,
    "output_dir": "saves/qwen3-vl-4b/lora/sft", "logging_steps": 10, "save_steps": 500, "plot_loss": True,
    "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
    "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
    "ddp_timeout": 180000000, "resume_from_checkpoint": None,
}  # fmt: skip
LF_FULL_SFT = {  # examples/train_full/qwen3vl_full_sft.yaml: the LoRA example's keys but these
    **{k: v for k, v in LF_LORA_SFT.items() if k not in ("lora_rank", "lora_target")},
    "finetuning_type": "full", "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
    "freeze_language_model": False, "deepspeed": "examples/deepspeed/ds_z3_config.json",
    "output_dir": "saves/qwen3-vl-4b/full/sft", "gradient_accumulation_steps": 2, "learning_rate": 1.0e-5,
}  # fmt: skip
LF_LORA_DPO = {  # examples/train_lora/qwen3vl_lora_dpo.yaml
    **LF_LORA_SFT, "stage": "dpo", "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "rlhf_v",
    "output_dir": "saves/qwen3-vl-4b/lora/dpo", "learning_rate": 5.0e-6,
}  # fmt: skip
LF_INFERENCE = {
    "model_name_or_path": "Qwen/Qwen3-VL-4B-Instruct", "template": "qwen3_vl_nothink",
    "infer_backend": "huggingface", "trust_remote_code": True,
}  # fmt: skip
LF_MERGE = {
    "model_name_or_path": "Qwen/Qwen3-VL-4B-Instruct", "adapter_name_or_path": "saves/qwen3-vl-4b/lora/sft",
    "template": "qwen3_vl_nothink", "trust_remote_code": True, "export_dir": "saves/qwen3_vl_sft_merged",
    "export_size": 5, "export_device": "cpu", "export_legacy_format": False,
}  # fmt: skip


def test_llama_factorys_qwen3_vl_examples_validate(tmp_path: Path) -> None:
    """warmup_ratio (51 of LLaMA-Factory's example files) and logging_dir left TrainingArguments after
    transformers 5.6; they keep their old meaning: a ratio of the total steps, TensorBoard's folder."""
    from eqakit.train.sft import training_environment

    cfg = load_config("train", write(tmp_path, yaml.safe_dump(LF_LORA_SFT)))
    assert cfg.training.warmup_steps == 0.1 and cfg.training.get_warmup_steps(1000) == 100
    assert (
        cfg.training.gradient_accumulation_steps == 8
        and cfg.data.dataset == "mllm_demo,identity,alpaca_en_demo"
    )
    load_config("infer", write(tmp_path, yaml.safe_dump(LF_INFERENCE)))
    load_config("export", write(tmp_path, yaml.safe_dump(LF_MERGE)))
    zero3 = {"train_batch_size": "auto", "zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
    (tmp_path / "examples" / "deepspeed").mkdir(parents=True)
    write(tmp_path / "examples" / "deepspeed", json.dumps(zero3), "ds_z3_config.json")
    with contextlib.chdir(tmp_path):  # LLaMA-Factory's examples name it relative to its root
        full = load_config("train", write(tmp_path, yaml.safe_dump(LF_FULL_SFT)))
    assert full.finetuning.finetuning_type == "full" and full.training.learning_rate == 1.0e-5
    dpo = load_config("train", write(tmp_path, yaml.safe_dump(LF_LORA_DPO)))
    assert dpo.finetuning.stage == "dpo" and dpo.finetuning.pref_beta == 0.1

    logged = load_config("train", write(tmp_path, yaml.safe_dump({**LF_LORA_SFT, "logging_dir": "~/tb"})))
    assert training_environment(logged) == {"TENSORBOARD_LOGGING_DIR": str(Path("~/tb").expanduser())}
    assert training_environment(cfg) == {}
    for extra, needle in (
        ({"warmup_ratio": 1.0}, "'warmup_ratio': 1.0 is out of range (must be < 1.0)"),
        ({"warmup_steps": 20}, "warmup_ratio: 0.1 and warmup_steps: 20 both set the warmup"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config("train", write(tmp_path, yaml.safe_dump({**LF_LORA_SFT, **extra})))


def test_fa2_is_refused_before_any_weight_loads_where_it_cannot_run(tmp_path: Path) -> None:
    """flash-attn is not installed here (nor a GPU): one line naming the key and the fix. With both,
    packed training rows would still be refused (FA2 takes no shared-prefix mask)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    keys = {**LF_LORA_SFT, "flash_attn": "fa2"}
    with pytest.raises(
        ConfigError, match=r"flash_attn: fa2 needs the flash-attn package .* use flash_attn: auto"
    ):
        load_config("train", write(tmp_path, yaml.safe_dump(keys)))
