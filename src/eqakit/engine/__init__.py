"""Inference shared by predict, api, webui and chat: the interface (`eqakit.engine.base`), the
request types (`eqakit.engine.params`), the backends (`eqakit.engine.hf`, `eqakit.engine.vllm`) and
the loader that picks one (`eqakit.engine.load`)."""

from eqakit.engine.base import (
    EngineUnavailable,
    InferenceEngine,
    RequestFailed,
    Submission,
    TextStream,
    Worker,
)
from eqakit.engine.hf.engine import HFEngine
from eqakit.engine.load import load_engine, make_worker
from eqakit.engine.params import Completion, PromptTooLong, Request, RequestError, SamplingParams

__all__ = [
    "Completion",
    "HFEngine",
    "EngineUnavailable",
    "InferenceEngine",
    "PromptTooLong",
    "Request",
    "RequestError",
    "RequestFailed",
    "SamplingParams",
    "Submission",
    "TextStream",
    "Worker",
    "load_engine",
    "make_worker",
]
