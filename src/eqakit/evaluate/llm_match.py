"""`eqakit judge`: OpenEQA's LLM-Match score, with any OpenAI-compatible chat endpoint as the judge.

LLM-Match is the metric of the OpenEQA paper (GPT-4V 55.3, humans 86.8). This follows the official
evaluation (facebookresearch/open-eqa, evaluate-predictions.py and openeqa/evaluation/llm_match.py):

- each prediction is cut after its last period, then a judge LLM marks it 1-5 against the reference
  answer, with an MMBench-style prompt holding three worked examples (marks 1, 3 and 5) and a variant
  listing the extra answers when the question has them; temperature 0.2, seed 1234, 32 tokens;
- LLM-Match = mean over questions of 100 * (clip(mark, 1, 5) - 1) / 4; a missing or empty
  prediction scores 0 without asking the judge.

What eqakit adds: concurrent requests; the SDK's retries with backoff on 429/5xx/timeouts; every
judgement appended to a JSONL cache as it arrives, keyed by the exact request, so an interrupted or
repeated run asks nothing twice; a reply without a readable mark is re-asked once, then recorded as a
failure, counted as mark 1 (it scores 0, as in the official clip) and listed in the summary.

    eqakit judge --predictions runs/eval/generated_predictions.jsonl --dataset-dir data/openeqa \\
        --base-url https://api.openai.com/v1 --model gpt-4o

Raises DataError for unreadable files, malformed rows and prediction ids missing from the questions,
before any request is sent; EqakitError when the judge endpoint keeps failing (work so far is kept).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from eqakit.data.dataset import ALPACA_COLUMNS, Sample, alpaca_messages
from eqakit.data.media import question_text
from eqakit.errors import ConfigError, DataError, EqakitError
from eqakit.evaluate.metrics import sort_categories
from eqakit.evaluate.report import scores_markdown
from eqakit.fsutil import write_text_atomic
from eqakit.run_record import provenance

_INSTRUCTIONS = """\
You are grading answers to questions that a household robot was asked about what it saw.
Compare the response with the correct answer{extra_clause} and give the response a mark: a single
integer from 1 to 5. 5 means the response says the same thing as {target}. 1 means the response is
wrong or unrelated. Use 2, 3 or 4 when the response is partly right.
"""

# (question, answer, extra answers, response, mark): one example per anchor mark, as in MMBench.
_EXAMPLES = (
    ("What color is the sofa in the living room?", "grey", ("gray", "light grey", "grey fabric"), "red", 1),
    (
        "Where did I leave my keys?",
        "on the kitchen counter",
        ("kitchen counter", "next to the sink", "on the counter"),
        "in the kitchen",
        3,
    ),
    (
        "Is the bedroom door open?",
        "yes",
        ("yes, it is open", "it is open", "the door is open"),
        "Yes, the door is open.",
        5,
    ),
)

PROMPT_VERSION = "eqakit-mmbench-1"  # recorded in the summary; change it whenever the prompt changes


@dataclass(frozen=True)
class ReferenceQuestion:
    """A reference question: what the judge compares a prediction with."""

    question_id: str
    question: str
    answer: str
    extra_answers: tuple[str, ...] | None
    category: str | None


@dataclass(frozen=True)
class JudgeItem:
    """One prediction to mark; ``prediction`` is already truncated, None when missing or empty."""

    question: ReferenceQuestion
    prediction: str | None


@dataclass(frozen=True)
class JudgeSettings:
    """How to reach the judge and how to sample it (defaults: OpenEQA's official settings)."""

    base_url: str
    model: str
    api_key: str
    temperature: float = 0.2
    seed: int = 1234
    max_tokens: int = 32
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 60.0


def build_prompt(question: ReferenceQuestion, prediction: str) -> str:
    """The grading prompt: instructions, three worked examples, then the question to mark."""
    extra = question.extra_answers is not None

    def block(q: str, answer: str, extras: Sequence[str], response: str) -> str:
        lines = [f"Question: {q}", f"Answer: {answer}"]
        if extra:
            lines.append("Extra answers: " + "; ".join(extras))
        return "\n".join([*lines, f"Response: {response}"])

    parts = [
        _INSTRUCTIONS.format(
            extra_clause=", and with extra answers that are also correct," if extra else "",
            target="the answer or any of the extra answers" if extra else "the answer",
        )
    ]
    for number, (q, answer, extras, response, mark) in enumerate(_EXAMPLES, start=1):
        parts.append(f"Example {number}:\n{block(q, answer, extras, response)}\nYour mark: {mark}\n")
    parts.append(
        f"Your turn:\n{block(question.question, question.answer, question.extra_answers or (), prediction)}"
    )
    return "\n".join(parts) + "\nYour mark:"


def truncate_prediction(text: str) -> str:
    """Drop anything after the last period, as OpenEQA's evaluate-predictions.py does."""
    end = text.rfind(".")
    return text[: end + 1] if 0 <= end < len(text) - 1 else text


_TAGGED = re.compile(r"mark\W{0,6}?(\d+)", re.IGNORECASE)
_OUT_OF_FIVE = re.compile(r"\s*(?:/|out of)\s*5\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])\d+(?!\.?\d)")  # integers only: "3.5" is no mark


def parse_mark(reply: str | None) -> int | None:
    """The judge's mark, or None when the reply does not state exactly one.

    Accepts a bare integer (OpenEQA's own parser), the first "Your mark: N" (also in markdown or without
    "Your"), and otherwise a reply with exactly one number ("I'd give it a 4.", "4/5").
    """
    text = (reply or "").strip()
    if text.isdigit():
        return int(text)
    tagged = _TAGGED.search(text)
    if tagged:
        return int(tagged.group(1))
    numbers = set(_NUMBER.findall(_OUT_OF_FIVE.sub("", text)))
    return int(numbers.pop()) if len(numbers) == 1 else None


def mark_to_score(mark: int) -> float:
    """OpenEQA's per-question score: 100 * (clip(mark, 1, 5) - 1) / 4."""
    return 100.0 * (min(max(mark, 1), 5) - 1) / 4


# ---- reading inputs ----------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a line that is not a JSON object is a DataError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number}: not valid JSON ({exc.msg}); fix or remove the line"
            ) from exc
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _extra_answers(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: 'extra_answers' must be a list of strings, got {value!r}")
    return tuple(value)


def _text_field(row: dict[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} is missing or empty (got {value!r})")
    return value


def load_questions_json(path: str | os.PathLike[str]) -> dict[str, ReferenceQuestion]:
    """Questions from OpenEQA's official JSON (a list of {question_id, question, answer, ...})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the questions file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of questions (OpenEQA's open-eqa-v0.json layout)")
    questions: dict[str, ReferenceQuestion] = {}
    for index, row in enumerate(data):
        where = f"{path} item {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        qid = _text_field(row, "question_id", where)
        if qid in questions:
            raise DataError(f"{where}: duplicate question_id {qid!r}")
        questions[qid] = ReferenceQuestion(
            question_id=qid,
            question=_text_field(row, "question", where),
            answer=_text_field(row, "answer", where),
            extra_answers=_extra_answers(row.get("extra_answers"), where),
            category=row.get("category"),
        )
    return questions


_SPLIT_FILES = ("open_eqa_test.jsonl", "open_eqa_train_val.jsonl")


def _dataset_split(path: Path) -> list[ReferenceQuestion]:
    questions = []
    for number, row in _read_jsonl(path):
        where = f"{path} line {number}"
        _text_field(row, "instruction", where)
        messages, _ = alpaca_messages(row, ALPACA_COLUMNS, where)
        questions.append(
            ReferenceQuestion(
                question_id=_text_field(row, "question_id", where),
                question=question_text(Sample(messages, [])),
                answer=_text_field(row, "output", where),
                extra_answers=_extra_answers(row.get("extra_answers"), where),
                category=row.get("category"),
            )
        )
    return questions


def load_dataset_questions(dataset_dir: str | os.PathLike[str]) -> dict[str, ReferenceQuestion]:
    """Questions from a directory written by `eqakit prepare` (test split first, then train_val)."""
    dataset_dir = Path(dataset_dir)
    files = [dataset_dir / name for name in _SPLIT_FILES if (dataset_dir / name).is_file()]
    if not files:
        raise DataError(
            f"{dataset_dir} holds neither {' nor '.join(_SPLIT_FILES)}: pass a directory written by "
            "`eqakit prepare openeqa`, or the official questions JSON with --questions"
        )
    questions: dict[str, ReferenceQuestion] = {}
    for path in files:
        for question in _dataset_split(path):
            if question.question_id in questions:
                raise DataError(
                    f"{path}: question_id {question.question_id!r} appears twice in {dataset_dir}"
                )
            questions[question.question_id] = question
    return questions


def _ids_by_position(path: Path, rows: list[tuple[int, dict[str, Any]]], dataset_dir: Path) -> list[str]:
    """Question ids for LLaMA-Factory's own predictions, which keep the test split's order but no ids."""
    test_path = dataset_dir / _SPLIT_FILES[0]
    if not test_path.is_file():
        raise DataError(
            f"{path}: rows have no question_id and {test_path} does not exist to match them by position"
        )
    test = _dataset_split(test_path)
    if len(rows) > len(test):
        raise DataError(f"{path}: {len(rows)} rows without question_id, but {test_path} has only {len(test)}")
    for index, ((number, row), question) in enumerate(zip(rows, test, strict=False), start=1):
        if str(row.get("label", "")).strip() != question.answer.strip():
            raise DataError(
                f"{path} line {number}: label {row.get('label')!r} differs from the answer {question.answer!r} "
                f"of row {index} of {test_path}; rows without question_id must be LLaMA-Factory "
                "predictions of that test split, in order"
            )
    return [question.question_id for question in test[: len(rows)]]


def load_items(
    predictions_path: str | os.PathLike[str],
    questions: dict[str, ReferenceQuestion],
    dataset_dir: str | os.PathLike[str] | None = None,
) -> list[JudgeItem]:
    """Pair each prediction row with its question; every problem is reported before any request.

    Rows need ``question_id`` and ``predict``. Rows without any question_id (LLaMA-Factory's own
    generated_predictions.jsonl) are matched by position to the test split of ``dataset_dir``.
    """
    path = Path(predictions_path)
    rows = _read_jsonl(path)
    if not rows:
        raise DataError(f"{path} has no prediction rows")
    if dataset_dir is not None and all("question_id" not in row for _, row in rows):
        ids = _ids_by_position(path, rows, Path(dataset_dir))
    else:
        ids = []
        for number, row in rows:
            qid = row.get("question_id")
            if not isinstance(qid, str) or not qid:
                raise DataError(
                    f"{path} line {number}: no question_id; predictions from `eqakit train` on a dataset "
                    "made by `eqakit prepare` carry one (or pass --dataset-dir to match LLaMA-Factory's by order)"
                )
            ids.append(qid)
    seen: dict[str, int] = {}
    unknown = []
    for (number, _), qid in zip(rows, ids, strict=True):
        if qid in seen:
            raise DataError(f"{path} line {number}: question_id {qid!r} already appears on line {seen[qid]}")
        seen[qid] = number
        if qid not in questions:
            unknown.append(f"{qid!r} (line {number})")
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(
            f"{path}: {len(unknown)} question_id(s) are not in the questions: {shown}; "
            "were these predictions made on another dataset?"
        )
    items = []
    for (_, row), qid in zip(rows, ids, strict=True):
        question = questions[qid]
        if question.category is None and row.get("category"):
            question = replace(question, category=row["category"])
        predict = row.get("predict")
        has_text = isinstance(predict, str) and predict.strip()
        items.append(JudgeItem(question, truncate_prediction(predict) if has_text else None))
    return items


# ---- judging --------------------------------------------------------------------------------------


def request_key(item: JudgeItem, settings: JudgeSettings) -> str:
    """Identity of a judge request: same prompt, model and sampling settings -> same cached judgement."""
    request = {
        "prompt": build_prompt(item.question, item.prediction or ""),
        "model": settings.model,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "max_tokens": settings.max_tokens,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Judgements already made, by request key. A torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the judgement cache {path}: {exc}") from exc
    records: dict[str, dict[str, Any]] = {}
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None and not (
                line.endswith(b"\n") and isinstance(record, dict) and "key" in record
            ):
                raise ValueError("incomplete record")
        except ValueError as exc:
            if offset + len(line) == len(data):  # the last line: written by a run that was killed
                os.truncate(path, offset)
                break
            raise DataError(
                f"{path} line {number}: not a judgement record ({exc}); delete the line or the file"
            ) from exc
        if record is not None:
            records[record["key"]] = record
        offset += len(line)
    return records


def _ask(client: openai.OpenAI, settings: JudgeSettings, prompt: str) -> str:
    completion = client.chat.completions.create(
        model=settings.model,
        messages=[{"role": "user", "content": prompt}],
        temperature=settings.temperature,
        seed=settings.seed,
        max_tokens=settings.max_tokens,
    )
    return (completion.choices[0].message.content or "") if completion.choices else ""


def _judge_one(client: openai.OpenAI, settings: JudgeSettings, item: JudgeItem, key: str) -> dict[str, Any]:
    prompt = build_prompt(item.question, item.prediction or "")
    replies: list[str] = []
    mark = None
    for _ in range(2):  # an unreadable reply is asked once more
        replies.append(_ask(client, settings, prompt))
        mark = parse_mark(replies[-1])
        if mark is not None:
            break
    return {
        "key": key,
        "question_id": item.question.question_id,
        "category": item.question.category,
        "prediction": item.prediction,
        "mark": mark,
        "replies": replies,
        "model": settings.model,
    }


def _api_error_message(
    exc: openai.OpenAIError, item: JudgeItem, settings: JudgeSettings, output: Path
) -> str:
    hint = f"check --base-url {settings.base_url} and --model {settings.model}"
    if isinstance(exc, openai.AuthenticationError):
        hint = (
            "the judge rejected the API key: set it in OPENAI_API_KEY or name its variable with --api-key-env"
        )
    return (
        f"judge request for question {item.question.question_id!r} failed: {exc}; {hint}. "
        f"Judgements made so far are saved in {output}: rerun to resume."
    )


def run_judge(
    items: Sequence[JudgeItem],
    settings: JudgeSettings,
    output: str | os.PathLike[str],
    retry_failures: bool = False,
) -> dict[str, Any]:
    """Mark every item not already in the cache file ``output``, then return the summary."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cache = load_cache(output)
    keys = [request_key(item, settings) if item.prediction is not None else None for item in items]

    def needs_asking(key: str | None) -> bool:
        record = cache.get(key) if key else None
        return key is not None and (record is None or (retry_failures and record["mark"] is None))

    todo = [(item, key) for item, key in zip(items, keys, strict=True) if needs_asking(key)]
    if len(todo) < len(items):
        print(
            f"eqakit judge: {len(items) - len(todo)} of {len(items)} questions need no request (cached or empty)"
        )
    errors: list[str] = []
    if todo:
        client = openai.OpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key,
            max_retries=settings.max_retries,
            timeout=settings.timeout,
        )
        pool = ThreadPoolExecutor(max_workers=settings.concurrency)
        try:
            futures: dict[Future[dict[str, Any]], JudgeItem] = {
                pool.submit(_judge_one, client, settings, item, key): item for item, key in todo
            }
            with (
                output.open("a", encoding="utf-8") as sink,
                tqdm(total=len(todo), desc="judging", unit="q") as bar,
            ):
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    try:
                        record = future.result()
                    except openai.OpenAIError as exc:
                        errors.append(_api_error_message(exc, futures[future], settings, output))
                        for other in futures:
                            other.cancel()
                        continue
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    cache[record["key"]] = record
                    bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise EqakitError(
            errors[0] + (f" ({len(errors) - 1} more requests failed)" if len(errors) > 1 else "")
        )
    return summarize(items, [cache[key] if key else None for key in keys], settings)


def summarize(
    items: Sequence[JudgeItem], records: Sequence[dict[str, Any] | None], settings: JudgeSettings
) -> dict[str, Any]:
    """LLM-Match overall and per category from each item's judgement record (None: no prediction)."""
    scores: list[tuple[str | None, float]] = []
    marks: Counter[int] = Counter()
    failures = []
    missing = 0
    for item, record in zip(items, records, strict=True):
        if record is None:
            missing += 1
            score = 0.0
        else:
            if record["mark"] is None:
                failures.append({"question_id": item.question.question_id, "replies": record["replies"]})
                score = mark_to_score(1)
            else:
                marks[record["mark"]] += 1
                score = mark_to_score(record["mark"])
        scores.append((item.question.category, score))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    categories = sort_categories(c for c, _ in scores if c)
    return {
        "predict_llm_match": mean([s for _, s in scores]),
        "num_samples": len(scores),
        "per_category": {
            name: {
                "predict_llm_match": mean([s for c, s in scores if c == name]),
                "num_samples": sum(1 for c, _ in scores if c == name),
            }
            for name in categories
        },
        "marks": {str(mark): count for mark, count in sorted(marks.items())},
        "num_missing_predictions": missing,
        "num_failures": len(failures),
        "failures": failures,
        "judge": {
            "model": settings.model,
            "base_url": settings.base_url,
            "temperature": settings.temperature,
            "seed": settings.seed,
            "max_tokens": settings.max_tokens,
            "prompt_version": PROMPT_VERSION,
        },
    }


# ---- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqakit judge",
        description="Score predictions with OpenEQA's LLM-Match, using an OpenAI-compatible chat endpoint as the judge.",
        epilog="example: eqakit judge --predictions runs/eval/generated_predictions.jsonl "
        "--dataset-dir data/openeqa --base-url https://api.openai.com/v1 --model gpt-4o",
    )
    parser.add_argument(
        "--predictions", metavar="FILE", type=Path, required=True, help="generated_predictions.jsonl to score"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--questions", metavar="FILE", type=Path, help="OpenEQA's questions JSON (open-eqa-v0.json)"
    )
    source.add_argument(
        "--dataset-dir", metavar="DIR", type=Path, help="a dataset directory written by `eqakit prepare`"
    )
    parser.add_argument(
        "--base-url", metavar="URL", required=True, help="the judge's API root, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--model", metavar="NAME", required=True, help="the judge model name, e.g. gpt-4o")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="judgement cache JSONL (default: llm_match.jsonl beside the predictions); "
        "the summary goes beside it as <name>_summary.json",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY, optional)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=JudgeSettings.concurrency,
        help=f"requests in flight at once (default: {JudgeSettings.concurrency})",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=JudgeSettings.temperature,
        help=f"judge temperature (OpenEQA: {JudgeSettings.temperature})",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=JudgeSettings.seed,
        help=f"judge sampling seed (OpenEQA: {JudgeSettings.seed})",
    )
    parser.add_argument(
        "--max-tokens",
        metavar="N",
        type=int,
        default=JudgeSettings.max_tokens,
        help=f"judge reply length limit (OpenEQA: {JudgeSettings.max_tokens})",
    )
    parser.add_argument(
        "--max-retries",
        metavar="N",
        type=int,
        default=JudgeSettings.max_retries,
        help="retries with backoff on 429/5xx/timeouts",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=JudgeSettings.timeout,
        help="seconds to wait for one reply",
    )
    parser.add_argument(
        "--retry-failures",
        action="store_true",
        help="re-ask questions whose cached reply had no readable mark",
    )
    return parser


def _api_key(env_name: str | None) -> str:
    value = os.environ.get(env_name or "OPENAI_API_KEY")
    if value:
        return value
    if env_name:
        raise ConfigError(f"--api-key-env {env_name}: the environment variable {env_name} is not set")
    return "EMPTY"  # local servers (vLLM, `eqakit api` without API_KEY) accept any key


def cli(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.max_retries < 0 or args.timeout <= 0:
        parser.error("--temperature and --max-retries must be >= 0 and --timeout > 0")
    settings = JudgeSettings(
        base_url=args.base_url,
        model=args.model,
        api_key=_api_key(args.api_key_env),
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        timeout=args.timeout,
    )
    if args.questions is not None:
        questions = load_questions_json(args.questions)
    else:
        questions = load_dataset_questions(args.dataset_dir)
    items = load_items(args.predictions, questions, args.dataset_dir)
    output: Path = args.output or args.predictions.parent / "llm_match.jsonl"
    marks = run_judge(items, settings, output, retry_failures=args.retry_failures)
    summary = {
        **provenance("judge"),
        "judge": {
            k: getattr(settings, k) for k in ("base_url", "model", "temperature", "seed", "max_tokens")
        },
        **marks,
        "predictions": str(args.predictions),
        "judgements": str(output),
    }
    summary_path = write_text_atomic(
        output.with_name(f"{output.stem}_summary.json"),
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
    )
    print(scores_markdown(summary))
    if summary["num_failures"]:
        ids = ", ".join(f["question_id"] for f in summary["failures"][:10])
        print(
            f"{summary['num_failures']} judge replies had no readable mark even when re-asked; they count as mark 1: "
            f"{ids}{' ...' if summary['num_failures'] > 10 else ''} (rerun with --retry-failures to re-ask)",
            file=sys.stderr,
        )
    print(f"summary: {summary_path}")
    return 0
