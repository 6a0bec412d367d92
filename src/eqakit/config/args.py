"""eqakit's configuration dataclasses: LLaMA-Factory's keys with LLaMA-Factory's meanings.

A config file is the union of these groups plus transformers' ``Seq2SeqTrainingArguments`` (for
`train`). Each field's ``metadata`` carries its help string and, where it has one, the allowed
``choices`` or range (``min``/``max``, inclusive unless ``min_exclusive``); `eqakit.config.load`
checks all of them before anything runs. Defaults are LLaMA-Factory's unless a comment says why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eqakit.data.template import TEMPLATES


def _f(default: Any, help: str, **rules: Any) -> Any:  # noqa: A002 - mirrors dataclasses' own vocabulary
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class ModelArguments:
    """Which model to load, how, and how to export it."""

    model_name_or_path: str | None = _f(None, "Local directory or hub id of the base (or merged) model.")
    adapter_name_or_path: str | None = _f(
        None, "LoRA adapter directory, or several separated by commas (applied in order)."
    )
    cache_dir: str | None = _f(None, "Where downloaded models are cached (hub ids only).")
    model_revision: str = _f("main", "Hub revision (branch, tag or commit) of model_name_or_path.")
    trust_remote_code: bool = _f(
        False, "Allow model code from the checkpoint. Qwen-VL models need none; accepted."
    )
    flash_attn: str = _f(
        "auto",
        "Attention kernel: auto (sdpa), disabled (eager), sdpa, fa2.",
        choices=("auto", "disabled", "sdpa", "fa2"),
    )
    image_max_pixels: int = _f(768 * 768, "Largest image area fed to the vision tower, in pixels.", min=1)
    image_min_pixels: int = _f(32 * 32, "Smallest image area fed to the vision tower, in pixels.", min=1)
    video_max_pixels: int = _f(256 * 256, "Largest video frame area, in pixels.", min=1)
    video_min_pixels: int = _f(16 * 16, "Smallest video frame area, in pixels.", min=1)
    video_fps: float = _f(
        2.0,
        "Frames per second sampled from a video file; the spacing in time of a video given as frames.",
        min=0.0,
        min_exclusive=True,
    )
    video_maxlen: int = _f(128, "Most frames taken from one video (longer ones are sampled evenly).", min=1)
    quantization_bit: int | None = _f(
        None, "Load the base model in 4 or 8 bits (bitsandbytes, CUDA only).", choices=(4, 8)
    )
    quantization_method: str = _f(
        "bnb", "Quantization library; eqakit supports bitsandbytes ('bnb').", choices=("bnb",)
    )
    infer_backend: str = _f(
        "huggingface", "Generation backend: huggingface or vllm.", choices=("huggingface", "vllm")
    )
    vllm_maxlen: int = _f(4096, "vLLM backend: longest prompt plus reply (vLLM's max_model_len).", min=1)
    vllm_gpu_util: float = _f(
        0.7,
        "vLLM backend: share of accelerator memory (of RAM on vLLM's CPU build) vLLM may claim.",
        min=0.0,
        min_exclusive=True,
        max=1.0,
    )
    vllm_enforce_eager: bool = _f(False, "vLLM backend: no CUDA graphs (less memory, slower decoding).")
    vllm_max_lora_rank: int = _f(32, "vLLM backend: largest LoRA rank the engine reserves room for.", min=1)
    vllm_config: dict | None = _f(
        None, "vLLM backend: further vLLM engine arguments, a mapping or a JSON object string."
    )
    infer_dtype: str = _f(
        "auto",
        "Inference dtype: auto (bf16 on CUDA, fp16 on MPS, fp32 on CPU), float32, float16, bfloat16.",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    export_dir: str | None = _f(None, "Where `eqakit export` writes the merged model.")
    export_size: float = _f(
        5.0, "Largest weight shard written by export, in GB.", min=0.0, min_exclusive=True
    )
    export_device: str = _f(
        "cpu", "Device used to merge: cpu or auto (CUDA when available).", choices=("cpu", "auto")
    )
    export_legacy_format: bool = _f(False, "Write .bin (pickle) shards instead of .safetensors.")
    overwrite_output_dir: bool = _f(False, "Replace a non-empty output_dir / export_dir instead of refusing.")
    export_dtype: str = _f(
        "auto",
        "Dtype of exported weights: auto (the base model's), float32, float16, bfloat16.",
        choices=("auto", "float32", "float16", "bfloat16"),
    )

    @property
    def adapter_paths(self) -> list[str]:
        """adapter_name_or_path split on commas, as LLaMA-Factory does."""
        if not self.adapter_name_or_path:
            return []
        return [p.strip() for p in self.adapter_name_or_path.split(",") if p.strip()]


@dataclass
class DataArguments:
    """Which datasets, how they are rendered into prompts, and how long a sample may be."""

    template: str | None = _f(
        None,
        "Chat template: qwen3_vl_nothink or qwen3_vl (Qwen3-VL), qwen2_vl (Qwen2.5-VL).",
        choices=TEMPLATES,
    )
    dataset: str | None = _f(
        None, "Training dataset name(s) from dataset_dir/dataset_info.json, comma-separated."
    )
    eval_dataset: str | None = _f(None, "Evaluation/prediction dataset name(s), comma-separated.")
    dataset_dir: str = _f("data", "Directory holding dataset_info.json and the data files.")
    media_dir: str | None = _f(None, "Directory image paths are relative to (default: dataset_dir).")
    allow_outside_media: bool = _f(
        False,
        "eqakit: read dataset images whose paths resolve (following symlinks) outside dataset_dir and "
        "media_dir; by default such a row is refused, so a dataset file cannot make a run read other files.",
    )
    cutoff_len: int = _f(2048, "Largest number of tokens (text and image) in one sample.", min=1)
    train_on_prompt: bool = _f(False, "Also learn the prompt tokens (normally only answers are learned).")
    mask_history: bool = _f(False, "Learn only the last assistant turn of multi-turn samples.")
    preprocessing_num_workers: int | None = _f(
        None,
        "Processes that plan the training and evaluation samples (decode images, tokenize, fit cutoff_len) "
        "in parallel; unset: the main process alone. The plans are the same either way.",
        min=1,
    )
    preprocessing_batch_size: int = _f(
        1000, "Samples handed to a planning worker at a time (with preprocessing_num_workers).", min=1
    )
    max_samples: int | None = _f(None, "Use at most this many samples of each dataset.", min=1)
    val_size: float = _f(
        0.0, "Validation split of the training data: a fraction in [0, 1) or a number of samples.", min=0.0
    )
    packing: bool | None = _f(None, "Pack several samples into one sequence (eqakit: only false/unset).")
    default_system: str | None = _f(None, "System prompt added to every conversation that has none.")
    enable_thinking: bool = _f(True, "qwen3_vl template: let the model think before answering.")


@dataclass
class FinetuningArguments:
    """What is trained: LoRA on the language model by default (vision side frozen); all weights
    (``full``) or the last layers (``freeze``) of the parts not frozen, as LLaMA-Factory trains them."""

    stage: str = _f(
        "sft",
        "Training stage: sft (supervised fine-tuning) or dpo (preference tuning on chosen/rejected pairs).",
        choices=("sft", "dpo"),
    )
    finetuning_type: str = _f(
        "lora",
        "lora: train low-rank adapters; full: every weight of the parts not frozen; freeze: the "
        "freeze_trainable_layers last (or first) layers of those parts.",
        choices=("lora", "full", "freeze"),
    )
    lora_rank: int = _f(8, "LoRA rank r.", min=1)
    lora_alpha: float | None = _f(
        None, "LoRA scaling alpha (default: 2 x lora_rank, as in LLaMA-Factory).", min=0.0, min_exclusive=True
    )
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    lora_target: str = _f(
        "all",
        "Modules to adapt: 'all' (the language model's q/k/v/o/gate/up/down projections) or a comma list.",
    )
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = _f(
        False, "Weight-decomposed LoRA (DoRA): a trained magnitude per output beside the low-rank direction."
    )
    loraplus_lr_ratio: float | None = _f(
        None,
        "LoRA+: lora_B weights (and other 1-D trainable weights) learn at learning_rate times this ratio.",
        min=0.0,
        min_exclusive=True,
    )
    additional_target: str | None = _f(
        None,
        "Modules trained in full beside LoRA and saved in the adapter (peft's modules_to_save; a comma "
        "list of module names, each matching the modules whose name ends with it, e.g. norm).",
    )
    create_new_adapter: bool = _f(False, "Train a new adapter on top of merged adapter_name_or_path ones.")
    freeze_vision_tower: bool = _f(True, "Keep the vision encoder frozen.")
    freeze_multi_modal_projector: bool = _f(True, "Keep the vision-to-language merger frozen.")
    freeze_language_model: bool = _f(
        False,
        "No trainable weight in the language model: LoRA adapts the vision blocks (so it needs "
        "freeze_vision_tower: false), and the mergers train if freeze_multi_modal_projector: false.",
    )
    freeze_trainable_layers: int = _f(
        2,
        "finetuning_type: freeze: train the last n layers (negative: the first -n), counted over the "
        "language model's layers and matched by index in every stack of layers not frozen.",
    )
    freeze_trainable_modules: str = _f(
        "all",
        "finetuning_type: freeze: the parts of each trainable layer that train ('all', or a comma "
        "list such as self_attn,mlp).",
    )
    freeze_extra_modules: str | None = _f(
        None,
        "finetuning_type: freeze: modules outside the layers that train too (a comma list such as "
        "embed_tokens,norm; matched as substrings of parameter names, as in LLaMA-Factory).",
    )
    pref_beta: float = _f(
        0.1,
        "stage: dpo: beta, the weight of the log-ratio to the reference (sigmoid), of the odds ratio "
        "(orpo), the reward scale (simpo).",
        min=0.0,
        min_exclusive=True,
    )
    pref_loss: str = _f(
        "sigmoid",
        "stage: dpo: the preference loss: sigmoid (DPO, against the reference model), orpo or simpo "
        "(no reference).",
        choices=("sigmoid", "orpo", "simpo"),
    )
    pref_ftx: float = _f(
        0.0, "stage: dpo: weight of the chosen answer's SFT loss (mean token NLL) added to the loss.", min=0.0
    )
    dpo_label_smoothing: float = _f(
        0.0,
        "stage: dpo with pref_loss: sigmoid: the chance the preference label is wrong (robust DPO).",
        min=0.0,
        max=0.5,
    )
    simpo_gamma: float = _f(0.5, "stage: dpo with pref_loss: simpo: the target reward margin.")
    plot_loss: bool = _f(False, "Save training_loss.png and training_eval_loss.png in output_dir.")
    # TrainingArguments keys transformers dropped after 5.6, which LLaMA-Factory 0.9.5 (and 51 of its
    # example files) still take: kept with their old meaning.
    warmup_ratio: float | None = _f(
        None,
        "Linear warmup over this fraction of the total steps (transformers <= 5.6's key; given to "
        "transformers as a warmup_steps below 1, which it reads as that ratio).",
        min=0.0,
        max=1.0,
        max_exclusive=True,
    )
    logging_dir: str | None = _f(
        None,
        "TensorBoard's log directory with report_to: tensorboard (transformers <= 5.6's key; default "
        "output_dir/runs/DATE_HOST, given to transformers as TENSORBOARD_LOGGING_DIR).",
    )
    vision_feature_cache: bool = _f(
        True, "eqakit: run the frozen vision tower once per distinct image and reuse its features (exact)."
    )
    shared_prefix_packing: bool = _f(
        True,
        "eqakit: train questions about the same frames as branches of one sequence (exact loss, fewer tokens).",
    )
    compute_accuracy: bool = _f(
        False,
        "Report eval_accuracy with every evaluation: the share of answer tokens the model predicts "
        "(greedy, teacher-forced), averaged over samples as LLaMA-Factory does. Needs an evaluation set.",
    )
    disable_gradient_checkpointing: bool = _f(
        False,
        "Keep every activation for the backward pass. By default, as in LLaMA-Factory, layers with "
        "trainable weights recompute their activations instead (less memory, more time; same gradients).",
    )
    use_reentrant_gc: bool = _f(
        True, "Gradient checkpointing with torch's reentrant implementation (LLaMA-Factory's default)."
    )


@dataclass
class GeneratingArguments:
    """Decoding settings for predict, chat, webui and api (requests may override them)."""

    do_sample: bool = _f(True, "Sample; false (or temperature 0) decodes greedily.")
    temperature: float = _f(0.95, "Sampling temperature; 0 means greedy.", min=0.0)
    top_p: float = _f(0.7, "Nucleus sampling mass.", min=0.0, max=1.0, min_exclusive=True)
    top_k: int = _f(50, "Sample among the k most likely tokens (0: no limit).", min=0)
    num_beams: int = _f(1, "Beam search width; eqakit decodes with 1.", min=1, max=1)
    max_new_tokens: int = _f(1024, "Largest number of generated tokens.", min=1)
    repetition_penalty: float = _f(
        1.0, "Penalty on repeated tokens (1.0: none).", min=0.0, min_exclusive=True
    )
    skip_special_tokens: bool = _f(True, "Drop special tokens from decoded text.")


@dataclass
class ApiArguments:
    """eqakit's keys for `eqakit api`: which images a request may point at, and the limits it must fit.

    Host, port, API key and model name come from the API_* environment variables (LLaMA-Factory's).
    """

    api_media_dir: str | None = _f(
        None,
        "Directory that local image paths in requests are read from (unset: local paths are refused). "
        "Paths cannot leave it, through '..' or symlinks.",
    )
    api_allow_remote_images: bool = _f(
        False,
        "Fetch http(s) image URLs. Private, loopback, link-local and other non-public addresses are "
        "refused (checked after DNS resolution) unless listed in api_trusted_networks.",
    )
    api_trusted_networks: str | None = _f(
        None,
        "Comma-separated networks (CIDR, e.g. 10.0.0.0/8) image URLs may point into although they are "
        "not public: an explicit opt-in for an image server on a private network.",
    )
    api_remote_timeout: float = _f(
        10.0, "Seconds allowed for fetching one remote image.", min=0.0, min_exclusive=True
    )
    api_max_image_mb: float = _f(
        20.0,
        "Largest image file read from a URL or the media directory, in MiB.",
        min=0.0,
        min_exclusive=True,
    )
    api_max_images: int = _f(16, "Most images and videos one request may carry.", min=1)
    api_max_image_pixels: int = _f(
        40_000_000,
        "Largest image (width x height) accepted; larger ones are refused before they are decoded "
        "(decompression bombs).",
        min=1,
    )
    api_max_request_pixels: int = _f(
        80_000_000,
        "Most pixels (width x height, summed over its images) one request may ask the server to decode; "
        "bounds the memory a single request can take.",
        min=1,
    )
    api_max_decoded_frames: int = _f(
        10_000,
        "Most video frames one request may have decoded, over all its video files (every frame up "
        "to the last one sampled is decoded, chosen or not); a header that shows more is refused "
        "before decoding.",
        min=1,
    )
    api_max_decoded_pixels: int = _f(
        4_000_000_000,
        "Most pixels (width x height, summed over every decoded frame) one request's video files "
        "may cost to decode: bounds the CPU time a request can take (about 2,000 frames of 1080p).",
        min=1,
    )
    api_video_timeout: float = _f(
        30.0,
        "Seconds a request's video files may take to decode, waiting for a decoder included (a "
        "request over it gets 400; one whose client leaves stops decoding).",
        min=0.0,
        min_exclusive=True,
    )
    api_max_body_mb: float = _f(
        64.0, "Largest request body, in MiB (larger requests get 413).", min=0.0, min_exclusive=True
    )
    api_max_new_tokens: int = _f(
        4096, "Largest max_tokens / max_completion_tokens a request may ask for.", min=1
    )
    api_max_n: int = _f(8, "Largest n (choices per request).", min=1)
    api_max_batch_size: int = _f(16, "Most sequences the engine decodes together.", min=1)
    api_max_batch_tokens: int | None = _f(
        None,
        "KV-cache budget of the engine's batch, in tokens over all its sequences (prompt plus answer "
        "still to come); requests wait for room rather than exceed it. Unset: bounded by "
        "api_max_batch_size alone. Refused with infer_backend: vllm (vLLM manages its own cache).",
        min=1,
    )
    api_batch_window_ms: float = _f(
        10.0,
        "How long the engine waits for more requests to start together with the first one. Refused "
        "with infer_backend: vllm (vLLM schedules continuously).",
        min=0.0,
    )
    api_header_timeout: float = _f(
        10.0,
        "Seconds a connection may take to send a request's headers (slow or stalled clients are "
        "disconnected, so they cannot hold connections open).",
        min=0.0,
        min_exclusive=True,
    )
    api_body_timeout: float = _f(
        60.0,
        "Seconds a request may take to send its whole body (a stalled upload gets 408).",
        min=0.0,
        min_exclusive=True,
    )
    api_drain_timeout: float = _f(
        30.0, "On SIGTERM, seconds to let in-flight requests finish before exiting.", min=0.0
    )


GROUPS = (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments, ApiArguments)
