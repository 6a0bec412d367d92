"""`eqakit train eval_args.yaml` with ``do_predict: true``: answer every question of eval_dataset and score it.

What LLaMA-Factory's predict stage writes, computed the same way, plus what it lacks:
- output_dir/generated_predictions.jsonl: one row per sample (``prompt``, ``predict``, ``label``; also
  ``question_id``, ``category``, ``extra_answers``, ``images`` when the dataset has them, and the
  sample's ``index`` in eval_dataset), appended and flushed as answers complete, then rewritten in
  dataset order at the end;
- predict_results.json and all_results.json: LLaMA-Factory's BLEU-4 / ROUGE keys and speed keys, plus
  exact match, token F1 and every metric per OpenEQA category; report.md with the tables;
- eqakit_predict.json: versions, git commit, the config (set and resolved), model, adapters,
  device and dtype, decoding and results.

Resumable: a rerun with the same output_dir keeps the rows already written (matched by question_id,
or by index, and by prompt) and generates only the rest; ``overwrite_output_dir: true`` starts over.
``preprocessing_num_workers`` (the seed's YAML sets 4) is that many threads decoding the next
samples' frames while the engine generates. Questions that share frames are generated next to each other, so the engine runs each frame through
the vision tower once and prefills each episode's frames once. A sample too long for cutoff_len has
its images scaled down to fit; one that cannot fit even then is left out and counted. Sampling
(``do_sample: true`` with temperature > 0, LLaMA-Factory's default) draws from a per-sample seed
derived from ``seed``, so a resumed run samples as an uninterrupted one would.

Raises DataError before any generation for: eval_dataset missing from dataset_info.json, and every
row's media problems at once, as training words them (`eqakit.data.media.check_media`: placeholders
that disagree with the row's images or videos, missing or unreadable images and videos).

    eqakit train configs/eval_args.yaml
    eqakit train configs/eval_args.yaml adapter_name_or_path=saves/run2 output_dir=saves/eval2
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from eqakit.config.load import Config
from eqakit.data.dataset import Sample, load_samples
from eqakit.data.encode import Geometry, PromptFormat, VideoBudget
from eqakit.data.media import MediaCache, check_media, media_key
from eqakit.data.template import THINK, render_prompt, strip_thinking
from eqakit.data.video import Video, VideoInfo
from eqakit.engine import (
    InferenceEngine,
    PromptTooLong,
    Request,
    RequestError,
    RequestFailed,
    SamplingParams,
    load_engine,
)
from eqakit.errors import DataError, EqakitError
from eqakit.evaluate.metrics import METRIC_KEYS, score_predictions
from eqakit.evaluate.ranks import Ranks, parts
from eqakit.evaluate.report import write_report
from eqakit.fsutil import write_text_atomic
from eqakit.model.load import check_model
from eqakit.run_record import record, write_record

PREDICTIONS = "generated_predictions.jsonl"
RECORD = "eqakit_predict.json"  # how the predictions were made (`eqakit.run_record`)
META_FIELDS = ("question_id", "category", "extra_answers")
MAX_ROWS = 64  # sequences decoded together at most, however many fit the KV budget
PREFETCH = 32  # samples whose frames are decoded ahead with preprocessing_num_workers >= 2


def kv_budget(cfg: Config) -> int:
    """The KV-cache budget per_device_eval_batch_size stands for, in tokens.

    LLaMA-Factory's predict holds that many whole sequences of up to cutoff_len + max_new_tokens
    tokens: that is the memory the user gives generation. eqakit fills it with as many questions as
    fit (`HFEngine`), so at the tutorial's batch size 2 an episode's short questions decode together.
    """
    assert cfg.training is not None
    return cfg.training.per_device_eval_batch_size * (cfg.data.cutoff_len + cfg.generating.max_new_tokens)


@dataclass(frozen=True)
class Checked:
    """What `preflight` found: eval_dataset's samples, their image sizes and probed videos, and
    each prompt as the predictions file shows it."""

    samples: list[Sample]
    sizes: list[list[tuple[int, int]]]
    videos: list[list[VideoInfo]]
    prompts: list[str]


def preflight(cfg: Config) -> Checked:
    """Every check predict makes before it loads weights: the model's config and adapters, every
    row of eval_dataset and its media (sizes and video headers), each prompt rendered from the
    model's config alone. `eqakit config` runs it too."""
    if cfg.training is None or not cfg.data.eval_dataset:
        raise EqakitError("predict needs a train config with do_predict: true and eval_dataset set")
    geometry = check_model(cfg.model)
    samples = load_samples(
        cfg.data.eval_dataset,
        cfg.data.dataset_dir,
        cfg.data.media_dir,
        cfg.data.max_samples,
        allow_outside_media=cfg.data.allow_outside_media,
    )
    if not samples:
        raise DataError(f"eval_dataset {cfg.data.eval_dataset!r} has no samples")
    sizes, videos = check_media(samples, VideoBudget.from_config(cfg))
    fmt = PromptFormat.from_config(cfg)
    prompts = [_prompt(fmt, geometry, s, v) for s, v in zip(samples, videos, strict=True)]
    return Checked(samples, sizes, videos, prompts)


def run_predict(cfg: Config, engine: InferenceEngine | None = None) -> dict[str, Any]:
    """Predict, write the files above to ``cfg.training.output_dir``, return the results dict.

    ``engine`` lets a caller reuse a loaded model (tests, notebooks); by default the config's
    model is loaded with the KV budget ``per_device_eval_batch_size`` stands for (`kv_budget`).
    The recipe, top to bottom: checks, output dir (resume), engine, plan, generate, score and write.
    """
    checked = preflight(cfg)
    ranks = Ranks.from_env()
    path = Path(cfg.training.output_dir) / PREDICTIONS
    done = _start_output_dir(cfg, checked, path, ranks)
    resumed = len(done)
    owned = engine is None
    engine = engine or _load_engine(cfg)
    placement = engine.placement()  # for the record, written after the engine is shut down
    try:
        work = _plan(cfg, engine, checked, done, ranks)
        started = time.perf_counter()
        _generate(cfg, engine, checked, work, done, path, ranks)
        runtime = time.perf_counter() - started
    finally:
        if owned:  # vLLM runs worker processes: stop them now, not at exit
            engine.shutdown()
    if ranks.world > 1:
        ranks.wait_for_all()
        ranks.close()
        runtime = time.perf_counter() - started  # until the last process is done
        if ranks.rank != 0:
            return {}  # process 0 merges every process's answers and scores them
        done = _resume(path, checked.samples, checked.prompts, merge=True)
    return _score_and_write(cfg, path, done, work, runtime, resumed, placement, ranks.world)


@dataclass(frozen=True)
class Work:
    """What this run generates: this process's samples in order (``todo``, an episode's questions
    together), how many all processes generate, those left out as too long, and how many had their
    images scaled down to fit."""

    todo: list[int]
    everyone: int
    too_long: list[str]
    scaled: int


def _start_output_dir(cfg: Config, checked: Checked, path: Path, ranks: Ranks) -> dict[int, dict[str, Any]]:
    """The output dir made (emptied of predictions with ``overwrite_output_dir``) and the rows of an
    earlier run that still match their samples, which this run keeps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.model.overwrite_output_dir and ranks.rank == 0:
        path.unlink(missing_ok=True)
        for part in parts(path):
            part.unlink()
    ranks.wait_for_all()  # no process reads what process 0 is still removing
    done = _resume(path, checked.samples, checked.prompts, merge=ranks.world == 1)
    if done and ranks.rank == 0:
        print(
            f"eqakit predict: resuming: {len(done)} of {len(checked.samples)} samples already predicted in {path}"
        )
    return done


def _load_engine(cfg: Config) -> InferenceEngine:
    """The config's engine; the transformers one batches within the eval batch size's KV budget
    (vLLM schedules its own batch)."""
    hf = cfg.model.infer_backend == "huggingface"
    return load_engine(
        cfg, max_batch_size=MAX_ROWS if hf else None, max_batch_tokens=kv_budget(cfg) if hf else None
    )


def _plan(cfg: Config, engine: InferenceEngine, checked: Checked, done: dict[int, Any], ranks: Ranks) -> Work:
    """Each sample not yet answered planned as the engine plans it (scaled down to fit cutoff_len,
    or left out when it cannot fit), in episode order, this process's share."""
    todo, too_long, scaled = [], [], 0
    for index, sample in enumerate(checked.samples):
        if index in done:
            continue
        try:
            plan = engine.plan(
                sample.prompt_messages, checked.sizes[index], sample.system, checked.videos[index]
            )
        except PromptTooLong as exc:
            too_long.append(f"{sample.source}: {exc}")
            continue
        except RequestError as exc:
            raise DataError(f"{sample.source}: {exc}") from None
        scaled += plan.scaled_down
        todo.append(index)
    for problem in too_long[:5] if ranks.rank == 0 else ():
        print(f"eqakit predict: left out (too long for cutoff_len {cfg.data.cutoff_len}): {problem}")
    # questions about the same frames next to each other: they share the vision tower and the prefix
    todo.sort(key=lambda i: (media_key(checked.samples[i]), i))
    mine = ranks.share(todo, lambda i: media_key(checked.samples[i]))
    return Work(mine, len(todo), too_long, scaled)


def _generate(
    cfg: Config,
    engine: InferenceEngine,
    checked: Checked,
    work: Work,
    done: dict[int, dict[str, Any]],
    path: Path,
    ranks: Ranks,
) -> None:
    """Answer ``work.todo``, each answer appended to this process's predictions file (and ``done``)
    as it completes, so that a stopped run keeps it."""
    samples, training = checked.samples, cfg.training
    base = SamplingParams.from_generating(cfg.generating)
    media = Path(cfg.data.media_dir or cfg.data.dataset_dir)
    loaded = _loaded(
        samples, checked.videos, work.todo, MediaCache(), cfg.data.preprocessing_num_workers or 1
    )
    requests = (
        Request(
            samples[i].prompt_messages,
            _params(base, training.seed, i),
            frames,
            samples[i].system,
            videos=clips,
        )
        for i, (frames, clips) in loaded
    )
    with (
        ranks.part(path).open("a", encoding="utf-8") as sink,
        tqdm(total=len(work.todo), desc="predict" + (f" (process {ranks.rank})" if ranks.world > 1 else ""),
             unit="sample", position=ranks.rank) as bar,
    ):  # fmt: skip
        try:
            for position, completion in engine.generate_iter(requests):
                index = work.todo[position]
                predict = strip_thinking(completion.text) if cfg.data.template == THINK else completion.text
                done[index] = _row(index, samples[index], checked.prompts[index], predict, media)
                sink.write(json.dumps(done[index], ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(1)
        except RequestFailed as failure:
            raise DataError(
                f"{samples[work.todo[failure.index]].source}: the model could not answer this sample "
                f"({failure.__cause__}); the {len(done)} answers so far are kept in "
                f"{ranks.part(path)}: fix or remove the row and run again to go on"
            ) from None


def _score_and_write(
    cfg: Config,
    path: Path,
    done: dict[int, dict[str, Any]],
    work: Work,
    runtime: float,
    resumed: int,
    placement: dict[str, str],
    processes: int,
) -> dict[str, Any]:
    """The predictions file in dataset order, the scores (LLaMA-Factory's files, report.md) and the
    run record; returns the results."""
    out = path.parent
    rows = [done[i] for i in sorted(done)]
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    steps = -(-work.everyone // cfg.training.per_device_eval_batch_size)
    scores = score_predictions(rows)
    results = _results(scores, runtime, work.everyone, steps, len(work.too_long), work.scaled, resumed)
    _write_results(out, results)
    decoding = _describe(SamplingParams.from_generating(cfg.generating))
    write_report(
        out / "report.md",
        scores,
        title=f"Predictions on {cfg.data.eval_dataset}",
        extra={
            "model": cfg.model.model_name_or_path,
            "adapters": cfg.model.adapter_name_or_path or "-",
            "decoding": decoding,
            "samples scored": len(rows),
            "left out (too long)": len(work.too_long),
            "generated this run": f"{work.everyone} in {runtime:.1f} s"
            + (f" ({processes} processes)" if processes > 1 else ""),
        },
    )
    made = {
        "model": cfg.model.model_name_or_path,
        "adapters": cfg.model.adapter_name_or_path,
        **placement,
        "decoding": decoding,
        "samples": len(rows),
        "processes": processes,
        "results": results,
    }
    write_record(out / RECORD, record(cfg, "predict", made))
    print(
        f"eqakit predict: {len(rows)} predictions in {path}; BLEU-4 {results['predict_bleu-4']:.2f}, "
        f"ROUGE-L {results['predict_rouge-l']:.2f}, exact match {results['predict_exact_match']:.2f}; "
        f"scores in {out / 'predict_results.json'} and {out / 'report.md'}"
    )
    return results


def _prompt(fmt: PromptFormat, geometry: Geometry, sample: Sample, videos: list[VideoInfo]) -> str:
    """The prompt as rendered for the model (one <|image_pad|> per image, one <|video_pad|> per
    temporal patch of each video's probed frames, or per video for a model without timestamps),
    for the predictions file."""
    return render_prompt(
        sample.prompt_messages,
        fmt.template,
        enable_thinking=fmt.enable_thinking,
        system=sample.system,
        default_system=fmt.default_system,
        video_times=geometry.video_times(videos),
    )


def _describe(params: SamplingParams) -> str:
    if params.greedy:
        return "greedy"
    return f"sampling (temperature {params.temperature}, top_p {params.top_p}, top_k {params.top_k})"


def _params(base: SamplingParams, seed: int, index: int) -> SamplingParams:
    """Decoding settings of one sample: a seed of its own, so resumed runs draw the same samples."""
    return base if base.greedy else base.replace(seed=seed * 1_000_003 + index)


def _row(index: int, sample: Sample, prompt: str, predict: str, media: Path) -> dict[str, Any]:
    """A predictions-file row; image paths as the dataset gives them (relative to its media directory)."""
    row: dict[str, Any] = {"prompt": prompt, "predict": predict, "label": sample.answer}
    row.update({key: sample.meta[key] for key in META_FIELDS if key in sample.meta})
    if sample.images:
        row["images"] = [
            p.relative_to(media).as_posix() if p.is_relative_to(media) else str(p) for p in sample.images
        ]
    row["index"] = index
    return row


def _resume(path: Path, samples: list[Sample], prompts: list[str], merge: bool) -> dict[int, dict[str, Any]]:
    """Rows of earlier runs that still match their sample (by question_id or index, and prompt),
    from ``path`` and the part files processes under torchrun write beside it (`ranks.parts`).

    With ``merge`` (one process, or process 0 once all are done) the file is rewritten with just
    those rows in dataset order and the parts removed, so a line cut short by a kill is not
    appended to; other processes only read.
    """
    sources = [p for p in (path, *parts(path)) if p.is_file()]
    by_qid = {s.meta["question_id"]: i for i, s in enumerate(samples) if "question_id" in s.meta}
    done: dict[int, dict[str, Any]] = {}
    for source in sources:
        for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run
            if not isinstance(row, dict) or not isinstance(row.get("predict"), str):
                continue
            index = by_qid.get(row.get("question_id"), row.get("index"))
            if isinstance(index, int) and 0 <= index < len(samples) and row.get("prompt") == prompts[index]:
                done[index] = row
    if merge and sources:
        write_text_atomic(path, "".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in sorted(done)))
        for part in parts(path):
            part.unlink()
    return done


def _loaded(
    samples: list[Sample], videos: list[list[VideoInfo]], todo: list[int], images: MediaCache, workers: int
) -> Iterator[tuple[int, tuple[list[Image.Image], list[Video]]]]:
    """(index, decoded frames) of each sample of ``todo``, in order.

    With ``preprocessing_num_workers`` of 2 or more, that many threads decode the frames of the
    next samples while the engine generates (Pillow's decoders release the GIL), at most
    PREFETCH samples ahead; with 1, each sample's frames are decoded when the engine asks for it.
    """
    if workers < 2:
        for i in todo:
            yield i, images.load(samples[i], videos[i])
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="eqakit-frames") as pool:
        order = iter(todo)
        pending: deque[tuple[int, Future[tuple[list[Image.Image], list[Video]]]]] = deque(
            (i, pool.submit(images.load, samples[i], videos[i])) for i in itertools.islice(order, PREFETCH)
        )
        try:
            while pending:
                i, frames = pending.popleft()
                following = next(order, None)
                if following is not None:
                    pending.append(
                        (following, pool.submit(images.load, samples[following], videos[following]))
                    )
                yield i, frames.result()
        finally:
            for _, frames in pending:  # stopped early (an error, an interrupt): decode no further
                frames.cancel()


def _results(
    scores: dict[str, Any],
    runtime: float,
    generated: int,
    steps: int,
    too_long: int,
    scaled: int,
    resumed: int,
) -> dict[str, Any]:
    """LLaMA-Factory's predict_* keys (speed over this run's generation), then eqakit's own."""
    results: dict[str, Any] = {key: round(scores[key], 4) for key in METRIC_KEYS}
    results.update(
        {
            "predict_runtime": round(runtime, 4),
            "predict_samples_per_second": round(generated / runtime, 3) if runtime > 0 else 0.0,
            "predict_steps_per_second": round(steps / runtime, 3) if runtime > 0 else 0.0,
            "predict_samples": scores["num_samples"],
            "predict_generated": generated,
            "predict_resumed": resumed,
            "predict_too_long": too_long,
            "predict_scaled_down": scaled,
            "predict_per_category": scores["per_category"],
        }
    )
    return results


def _write_results(out: Path, results: dict[str, Any]) -> None:
    """predict_results.json, and all_results.json updated with them (as transformers' Trainer does)."""
    text = json.dumps(results, indent=4, ensure_ascii=False, sort_keys=True) + "\n"
    write_text_atomic(out / "predict_results.json", text)
    merged: dict[str, Any] = {}
    all_path = out / "all_results.json"
    if all_path.is_file():
        try:
            merged = json.loads(all_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            merged = {}
    merged.update(results)
    write_text_atomic(all_path, json.dumps(merged, indent=4, ensure_ascii=False, sort_keys=True) + "\n")
