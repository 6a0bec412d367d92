"""One rule for the system prompt, the same token ids in every stage.

LLaMA-Factory's rule: a conversation's own system prompt, or ``default_system`` when it has none or
an empty one. A dataset row trained with a system prompt must be served with the same one, so the
prompt ids of training, predict, the API, the web UI and chat are compared for a conversation with
its own system prompt, without one, and with ``system: ""``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from transformers import AutoProcessor

from eqakit.config import load_config
from eqakit.data.encode import IGNORE_INDEX
from eqakit.data.template import render_prompt
from eqakit.engine import HFEngine, Request
from eqakit.model.load import load_geometry
from eqakit.serve.api import _engine_messages
from eqakit.serve.chat import ChatSession
from eqakit.serve.images import ImagePolicy
from eqakit.serve.protocol import parse_chat_request
from eqakit.serve.webui import chat_messages
from eqakit.serve.webui_model import ModelSlot
from eqakit.train.data import load_training_samples, plan_samples

DEFAULT = "You are a household robot."
OWN = "Answer in one word."
QUESTION = "Where is the lamp?"
VARIANTS = {"own": OWN, "none": None, "empty": ""}  # the row's system column


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("system-prompt")
    rows = []
    for system in VARIANTS.values():
        row = {"instruction": QUESTION, "input": "", "output": "Left."}
        if system is not None:
            row["system"] = system
        rows.append(row)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    (root / "dataset_info.json").write_text(
        json.dumps({"rows": {"file_name": "rows.jsonl", "columns": columns}})
    )
    keys = [
        f"model_name_or_path={tiny_model_dir}",
        "template=qwen3_vl_nothink",
        f"dataset_dir={root}",
        "dataset=rows",
        f"default_system={DEFAULT}",
        "cutoff_len=256",
    ]
    train_cfg = load_config(
        "train", None, [*keys, "do_train=true", "finetuning_type=lora", f"output_dir={root / 'out'}"]
    )
    infer_cfg = load_config("infer", None, keys)
    slot = ModelSlot()
    slot.load_from(infer_cfg)
    yield train_cfg, HFEngine.from_config(infer_cfg), AutoProcessor.from_pretrained(tiny_model_dir), slot
    slot.unload()


def expected_ids(processor, system: str | None) -> list[int]:
    text = render_prompt([{"role": "user", "content": QUESTION}], system=system)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_stage_gives_the_same_prompt_ids(setup, variant: str) -> None:
    train_cfg, engine, processor, slot = setup
    system = VARIANTS[variant]
    want = expected_ids(processor, OWN if variant == "own" else DEFAULT)  # "" falls back, as in LLaMA-Factory

    samples = load_training_samples(train_cfg)
    plans, kept, _ = plan_samples(samples, processor.tokenizer, load_geometry(train_cfg.model), train_cfg)
    plan = plans[list(VARIANTS).index(variant)]
    first_label = next(i for i, label in enumerate(plan.labels) if label != IGNORE_INDEX)
    training = plan.input_ids[:first_label]

    sample = kept[list(VARIANTS).index(variant)]
    predict = engine.prepare(Request(sample.prompt_messages, engine.params(), [], sample.system)).ids.tolist()

    openai_messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": QUESTION}
    ]
    chat_request = parse_chat_request(json.dumps({"model": "eqakit", "messages": openai_messages}).encode())
    api_messages = _engine_messages(chat_request, ImagePolicy())
    api = engine.prepare(Request(api_messages, engine.params())).ids.tolist()

    history = [{"role": "user", "text": QUESTION, "images": []}]
    box = system if system is not None else ""  # the page's System prompt box, as the user left it
    page = ModelSlot.request(slot.loaded, chat_messages(history), system=box)
    webui = slot.loaded.engine.prepare(page).ids.tolist()

    assert training == predict == api == webui == want


def test_terminal_chat_uses_default_system(setup) -> None:
    _, engine, processor, _ = setup
    session = ChatSession(engine, out=io.StringIO())
    assert engine.prepare(session.request(QUESTION)).ids.tolist() == expected_ids(processor, DEFAULT)
