"""The inference engine shared by predict, api, webui and chat (see eqakit.engine.engine)."""

from eqakit.engine.engine import Engine, TextStream
from eqakit.engine.params import Completion, PromptTooLong, Request, RequestError, SamplingParams
from eqakit.engine.worker import EngineUnavailable, EngineWorker, Submission

__all__ = [
    "Completion",
    "Engine",
    "EngineUnavailable",
    "EngineWorker",
    "PromptTooLong",
    "Request",
    "RequestError",
    "SamplingParams",
    "Submission",
    "TextStream",
]
