"""`eqakit judge` against a real HTTP judge: a small FastAPI app served by uvicorn on 127.0.0.1.

The stand-in judge reads the question, answers and response from the prompt it is sent and replies with a
deterministic mark (5: the response is one of the answers, 3: it contains one, 1: otherwise), a reply
without a mark for questions mentioning "garbage", and a 503 the first time it sees a "flaky" question.
It records every request, so tests can check what was asked, with which settings, and how often.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from eqakit.errors import ConfigError, DataError, EqakitError
from eqakit.evaluate.llm_match import (
    ReferenceQuestion,
    build_prompt,
    cli,
    mark_to_score,
    parse_mark,
    truncate_prediction,
)

JUDGE_MODEL = "judge-model"


class StandInJudge:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.flaky_seen: set[str] = set()
        self.required_key: str | None = None
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    @staticmethod
    def fields(prompt: str) -> dict[str, str]:
        turn = prompt.rsplit("Your turn:", 1)[1]
        return dict(line.split(": ", 1) for line in turn.strip().splitlines() if ": " in line)

    async def chat(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        if self.required_key and request.headers.get("authorization") != f"Bearer {self.required_key}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        if body["model"] != JUDGE_MODEL:
            return JSONResponse({"error": {"message": f"model {body['model']} not found"}}, status_code=404)
        fields = self.fields(body["messages"][-1]["content"])
        question, response = fields["Question"], fields["Response"].lower().strip(" .")
        if "flaky" in question and question not in self.flaky_seen:
            self.flaky_seen.add(question)
            return JSONResponse(
                {"error": {"message": "busy"}}, status_code=503, headers={"retry-after-ms": "10"}
            )
        answers = [
            fields["Answer"].lower(),
            *(a.lower() for a in fields.get("Extra answers", "").split("; ") if a),
        ]
        if "garbage" in question:
            reply = "I am not able to grade this response."
        elif response in answers:
            reply = "Your mark: 5"
        elif any(answer in response for answer in answers):
            reply = "Your mark: 3"
        else:
            reply = "Your mark: 1"
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def asked(self) -> list[str]:
        """Questions of the requests received so far, in arrival order."""
        return [self.fields(r["messages"][-1]["content"])["Question"] for r in self.requests]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    judge = StandInJudge()
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(judge.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "the stand-in judge did not start"
        time.sleep(0.02)
    judge.base_url = f"http://127.0.0.1:{port}/v1"
    yield judge
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def judge(server):
    server.requests.clear()
    server.flaky_seen.clear()
    server.required_key = None
    return server


# question_id -> (question, answer, extra answers, category, prediction, expected mark or None)
CASES = {
    "q1": ("What color is the chair?", "red", None, "attribute recognition", "Red.", 5),
    "q2": ("What is on the bed?", "a pillow", None, "object recognition", "a blanket", 1),
    "q3": (
        "Where is the kettle?",
        "kitchen",
        ["in the kitchen", "on the stove"],
        "object localization",
        "In the kitchen.",
        5,
    ),
    "q4": (
        "Which garbage can is full?",
        "the blue one",
        None,
        "object state recognition",
        "the red one",
        None,
    ),
    "q5": ("Is the tv on?", "no", None, "object state recognition", "", None),
    "q6": (
        "What is next to the lamp?",
        "chair",
        None,
        "object recognition",
        "A red chair. It is next to the lamp and",
        3,
    ),
    "q7": ("What flaky color is the rug?", "white", None, "attribute recognition", "white", 5),
}


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    questions = [
        {
            "question_id": qid,
            "question": q,
            "answer": a,
            "category": cat,
            "episode_history": "hm3d-v0/000-hm3d-BFRyYbPCCPE",
            **({"extra_answers": extra} if extra else {}),
        }
        for qid, (q, a, extra, cat, _, _) in CASES.items()
    ]
    questions.append(
        {"question_id": "unpredicted", "question": "Q?", "answer": "A", "category": "world knowledge"}
    )
    questions_path = tmp_path / "open-eqa-v0.json"
    questions_path.write_text(json.dumps(questions))
    predictions_path = tmp_path / "generated_predictions.jsonl"
    rows = [
        {"question_id": qid, "prompt": f"user\n{q}", "predict": pred, "label": a, "category": cat}
        for qid, (q, a, _, cat, pred, _) in CASES.items()
    ]
    predictions_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions_path, predictions_path


def _run(judge: StandInJudge, predictions: Path, *source: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    argv = ["--predictions", str(predictions), *source, "--base-url", judge.base_url, "--model", JUDGE_MODEL]
    assert cli([*argv, "--max-retries", "2", *extra]) == 0
    return json.loads((predictions.parent / "llm_match_summary.json").read_text())


def test_judge_scores_resumes_and_reports(judge, tmp_path, capsys):
    questions, predictions = _write_inputs(tmp_path)
    summary = _run(judge, predictions, "--questions", str(questions))

    # q5 (empty prediction) is never asked; q4's unreadable reply is asked twice; q7's 503 is retried.
    asked = judge.asked()
    assert sorted(asked) == sorted(
        [CASES[q][0] for q in ("q1", "q2", "q3", "q6", "q7")] + [CASES["q4"][0]] * 2 + [CASES["q7"][0]]
    )
    for request in judge.requests:  # OpenEQA's judge settings
        assert (request["temperature"], request["seed"], request["max_tokens"]) == (0.2, 1234, 32)
        assert request["model"] == JUDGE_MODEL
    prompts = {
        judge.fields(r["messages"][-1]["content"])["Question"]: r["messages"][-1]["content"]
        for r in judge.requests
    }
    assert "Response: A red chair.\n" in prompts[CASES["q6"][0]]  # cut after the last period
    assert "Extra answers: in the kitchen; on the stove" in prompts[CASES["q3"][0]]
    assert "Extra answers" not in prompts[CASES["q1"][0]].split("Your turn:")[1]

    scores = {qid: (mark_to_score(case[5]) if case[5] else 0.0) for qid, case in CASES.items()}
    assert scores == {"q1": 100.0, "q2": 0.0, "q3": 100.0, "q4": 0.0, "q5": 0.0, "q6": 50.0, "q7": 100.0}
    assert summary["predict_llm_match"] == pytest.approx(350 / 7)
    assert summary["num_samples"] == 7
    assert summary["stage"] == "judge" and summary["eqakit"] and "git_commit" in summary  # the run record
    assert summary["judge"]["model"] == JUDGE_MODEL and "api_key" not in json.dumps(summary)
    assert summary["per_category"] == {
        "object recognition": {"predict_llm_match": 25.0, "num_samples": 2},
        "attribute recognition": {"predict_llm_match": 100.0, "num_samples": 2},
        "object state recognition": {"predict_llm_match": 0.0, "num_samples": 2},
        "object localization": {"predict_llm_match": 100.0, "num_samples": 1},
    }
    assert list(summary["per_category"])[0] == "object recognition"  # OpenEQA's order
    assert summary["marks"] == {"1": 1, "3": 1, "5": 3}
    assert summary["num_missing_predictions"] == 1
    assert summary["num_failures"] == 1
    assert summary["failures"][0]["question_id"] == "q4"
    assert len(summary["failures"][0]["replies"]) == 2
    assert summary["judge"]["model"] == JUDGE_MODEL
    out = capsys.readouterr()
    assert "| Samples | LLM-Match |" in out.out and "| 7 | 50.00 |" in out.out
    assert "q4" in out.err and "--retry-failures" in out.err

    cache = predictions.parent / "llm_match.jsonl"
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(r["question_id"] for r in records) == ["q1", "q2", "q3", "q4", "q6", "q7"]

    # A second run asks nothing and reports the same.
    judge.requests.clear()
    assert _run(judge, predictions, "--questions", str(questions)) == summary
    assert judge.requests == []

    # --retry-failures re-asks only the failure (twice: it is still unreadable).
    assert _run(judge, predictions, "--questions", str(questions), extra=("--retry-failures",)) == summary
    assert judge.asked() == [CASES["q4"][0]] * 2


def test_resume_after_a_killed_run(judge, tmp_path):
    questions, predictions = _write_inputs(tmp_path)
    full = _run(judge, predictions, "--questions", str(questions))
    cache = predictions.parent / "llm_match.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    dropped = json.loads(lines[0])["question_id"]
    # As if the run was killed while writing its last record: one record lost, one torn line.
    cache.write_text("".join(lines[1:]) + lines[0][:25])
    judge.requests.clear()
    assert _run(judge, predictions, "--questions", str(questions)) == full
    assert len({judge.fields(r["messages"][-1]["content"])["Question"] for r in judge.requests}) == 1
    assert judge.asked()[0] == CASES[dropped][0]
    assert all(json.loads(line)["key"] for line in cache.read_text().splitlines())


def test_new_prediction_for_a_question_is_judged_again(judge, tmp_path):
    questions, predictions = _write_inputs(tmp_path)
    _run(judge, predictions, "--questions", str(questions))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    rows[1]["predict"] = "a pillow"  # q2 is now right
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge.requests.clear()
    summary = _run(judge, predictions, "--questions", str(questions))
    assert judge.asked() == [CASES["q2"][0]]
    assert summary["per_category"]["object recognition"]["predict_llm_match"] == 75.0


def _write_dataset(tmp_path: Path) -> Path:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    test_rows = [
        {
            "instruction": "<image><image>" + q,
            "input": "",
            "output": a,
            "images": ["open_eqa_frames/ep/000.jpg", "open_eqa_frames/ep/001.jpg"],
            "question_id": qid,
            "category": cat,
            "episode_history": "hm3d-v0/000-hm3d-BFRyYbPCCPE",
            **({"extra_answers": extra} if extra else {}),
        }
        for qid, (q, a, extra, cat, _, _) in CASES.items()
        if qid in ("q1", "q3", "q6")
    ]
    (dataset / "open_eqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    train = {**test_rows[0], "question_id": "train-1", "output": "blue"}
    (dataset / "open_eqa_train_val.jsonl").write_text(json.dumps(train) + "\n")
    return dataset


def test_dataset_dir_and_llamafactory_predictions(judge, tmp_path):
    dataset = _write_dataset(tmp_path)
    predictions = tmp_path / "generated_predictions.jsonl"
    # LLaMA-Factory's own file: prompt, predict, label, in the test split's order, no question_id.
    lf_rows = [
        {"prompt": "user\n...", "predict": "red", "label": "red"},
        {"prompt": "user\n...", "predict": "on the stove", "label": "kitchen"},
    ]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in lf_rows))
    summary = _run(judge, predictions, "--dataset-dir", str(dataset))
    assert sorted(judge.asked()) == ["What color is the chair?", "Where is the kettle?"]  # no <image>
    assert summary["predict_llm_match"] == 100.0
    assert set(summary["per_category"]) == {"attribute recognition", "object localization"}

    lf_rows[1]["label"] = "bathroom"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in lf_rows))
    with pytest.raises(DataError, match=r"line 2: label 'bathroom' differs from the answer 'kitchen'"):
        _run(judge, predictions, "--dataset-dir", str(dataset))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"question_id": "q1", "predict": "red"}\n{"question_id": "nope", "predict": "x"}\n',
            r"'nope' \(line 2\)",
        ),
        (
            '{"question_id": "q1", "predict": "red"}\n{"question_id": "q1", "predict": "x"}\n',
            "already appears on line 1",
        ),
        ('{"question_id": "q1", "predict": "red"}\n{"predict": "x"}\n', "line 2: no question_id"),
        ('{"question_id": "q1", "predict": "red"}\n{"question_id": "q2", "pre\n', "line 2: not valid JSON"),
        ("", "has no prediction rows"),
    ],
)
def test_bad_predictions_fail_before_any_request(judge, tmp_path, content, message):
    questions, predictions = _write_inputs(tmp_path)
    predictions.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        _run(judge, predictions, "--questions", str(questions))
    assert str(predictions) in str(info.value)
    assert judge.requests == []


def test_bad_questions_sources(judge, tmp_path):
    questions, predictions = _write_inputs(tmp_path)
    with pytest.raises(DataError, match="cannot read the questions file .*missing.json"):
        _run(judge, predictions, "--questions", str(tmp_path / "missing.json"))
    questions.write_text(json.dumps([{"question_id": "q1", "question": "Q?"}]))
    with pytest.raises(DataError, match=r"item 0: field 'answer' is missing"):
        _run(judge, predictions, "--questions", str(questions))
    with pytest.raises(DataError, match="neither open_eqa_test.jsonl nor open_eqa_train_val.jsonl"):
        _run(judge, predictions, "--dataset-dir", str(tmp_path))
    assert judge.requests == []


def test_judge_endpoint_errors_keep_work_and_explain(judge, tmp_path, monkeypatch):
    questions, predictions = _write_inputs(tmp_path)
    argv = ["--predictions", str(predictions), "--questions", str(questions), "--base-url", judge.base_url]
    with pytest.raises(EqakitError, match="failed: .*check --base-url .* and --model other-model"):
        cli([*argv, "--model", "other-model"])

    judge.required_key = "sk-secret"
    monkeypatch.setenv("MY_JUDGE_KEY", "wrong")
    with pytest.raises(EqakitError, match="rejected the API key"):
        cli([*argv, "--model", JUDGE_MODEL, "--api-key-env", "MY_JUDGE_KEY"])
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ConfigError, match="MY_JUDGE_KEY is not set"):
        cli([*argv, "--model", JUDGE_MODEL, "--api-key-env", "MY_JUDGE_KEY"])
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    assert cli([*argv, "--model", JUDGE_MODEL, "--api-key-env", "MY_JUDGE_KEY", "--concurrency", "2"]) == 0

    closed = f"http://127.0.0.1:{_free_port()}/v1"
    other = tmp_path / "other.jsonl"
    with pytest.raises(EqakitError, match=f"check --base-url {closed}"):
        cli(
            [
                *argv[:4],
                "--base-url",
                closed,
                "--model",
                JUDGE_MODEL,
                "--max-retries",
                "0",
                "--output",
                str(other),
            ]
        )


def test_bad_options_exit_2(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli(
            [
                "--predictions",
                "p",
                "--questions",
                "q",
                "--base-url",
                "u",
                "--model",
                "m",
                "--concurrency",
                "0",
            ]
        )
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli(["--predictions", "p", "--base-url", "u", "--model", "m"])  # no questions source


# ---- pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "mark"),
    [
        ("4", 4),
        ("Your mark: 5", 5),
        ("Your mark: 2\nThe response names a different object.", 2),
        ("**Your mark:** 3", 3),
        ("Mark: 4/5", 4),
        ("I would give this response a 1.", 1),
        ("4/5", 4),
        ("3 out of 5", 3),
        (" 5\n", 5),
        ("Your mark: 7", 7),  # clipped to 5 when scored, as OpenEQA does
        ("The response matches 2 of the 3 answers, so 4.", None),
        ("I cannot grade this.", None),
        ("3.5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_mark(reply, mark):
    assert parse_mark(reply) == mark


def test_mark_to_score_clips():
    assert [mark_to_score(m) for m in (0, 1, 2, 3, 4, 5, 7)] == [0.0, 0.0, 25.0, 50.0, 75.0, 100.0, 100.0]


@pytest.mark.parametrize(
    ("prediction", "cut"),
    [
        ("A red chair. It is next to", "A red chair."),
        ("A red chair. It is big.", "A red chair. It is big."),
        ("red", "red"),
        ("3.5 meters", "3."),  # OpenEQA's rule, applied as is
    ],
)
def test_truncate_prediction(prediction, cut):
    assert truncate_prediction(prediction) == cut


def test_prompt_has_three_anchored_examples_and_the_extra_variant():
    plain = build_prompt(ReferenceQuestion("q", "What is it?", "a mug", None, None), "a cup")
    assert [line for line in plain.splitlines() if line.startswith("Your mark: ")] == [
        "Your mark: 1",
        "Your mark: 3",
        "Your mark: 5",
    ]
    assert plain.endswith("Question: What is it?\nAnswer: a mug\nResponse: a cup\nYour mark:")
    assert "Extra answers" not in plain
    extra = build_prompt(
        ReferenceQuestion("q", "What is it?", "a mug", ("a cup", "coffee mug"), None), "a cup"
    )
    assert extra.count("Extra answers: ") == 4
    assert "Answer: a mug\nExtra answers: a cup; coffee mug\nResponse: a cup\nYour mark:" in extra
    assert "extra answers" in extra.splitlines()[1]


def test_the_judge_reads_questions_without_media_markup(tmp_path):
    """A dataset prepared with --as-video sent the judge a literal "<video>"; a rendered video prompt
    (Qwen3-VL's timestamped patches) is read as its question too."""
    from conftest import write_toy_dataset
    from eqakit.data.template import readable, render_prompt
    from eqakit.evaluate.llm_match import load_dataset_questions

    data = write_toy_dataset(tmp_path / "videos", episodes=1, questions=1, as_video=True)
    (data / "toy.jsonl").rename(data / "open_eqa_test.jsonl")
    assert [q.question for q in load_dataset_questions(data).values()] == ["What color is the ball?"]
    messages = [{"role": "user", "content": "<image><video>Where is the lamp?"}]
    prompt = render_prompt(messages, "qwen3_vl_nothink", video_times=[[0.5, 1.5]])
    assert "<|video_pad|>" in prompt and "seconds>" in prompt
    turn = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
    assert readable(turn) == "Where is the lamp?"


def test_judge_dataset_dir_on_video_data_sends_the_question_without_video(judge, tmp_path):
    """`eqakit judge --dataset-dir` on `prepare --as-video` data: the judge is asked the question a
    person reads (`eqakit.data.media.question_text`), never a literal "<video>"."""
    from conftest import write_toy_dataset

    data = write_toy_dataset(tmp_path / "videos", episodes=2, questions=2, as_video=True)
    rows = [json.loads(line) for line in (data / "toy.jsonl").read_text().splitlines()]
    assert all(r["instruction"].startswith("<video>") for r in rows)
    (data / "toy.jsonl").rename(data / "open_eqa_test.jsonl")
    predictions = tmp_path / "generated_predictions.jsonl"
    predictions.write_text(
        "".join(
            json.dumps({"question_id": r["question_id"], "prompt": "user\n...", "predict": r["output"],
                        "label": r["output"]}) + "\n"
            for r in rows
        )
    )  # fmt: skip
    summary = _run(judge, predictions, "--dataset-dir", str(data))
    assert judge.asked() == ["What color is the ball?"] * len(rows)
    assert not any("<video>" in m["content"] for r in judge.requests for m in r["messages"])
    assert summary["predict_llm_match"] == 100.0
