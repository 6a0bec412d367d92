"""A tiny random-weight Qwen-VL (Qwen3-VL by default) for tests and the demo.

Nothing can be downloaded where eqakit's tests run, yet every code path (processor, chat template,
vision tower, deepstack, M-RoPE, generation, LoRA, export) must run against the real transformers
classes. This builds a Qwen3-VL with the structure of Qwen3-VL-2B-Instruct at toy sizes:
Qwen3VLForConditionalGeneration, Qwen3VLProcessor (Qwen2-VL image processor, Qwen3-VL video
processor, patch 16, merge 2, one visual token per 32x32 pixels), a byte-level BPE tokenizer trained
here on a small built-in corpus with Qwen's special tokens, and Qwen3-VL-Instruct's chat template.
The weights are random, so the model's answers are noise; the shapes, token ids and formats are real.
``--arch qwen3_vl_moe`` builds Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration, as Qwen3-VL-30B-A3B);
``--arch qwen2_5_vl`` builds Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor: patch
14, window attention, no deepstack, as Qwen2.5-VL-3B-Instruct) with its chat template.

    eqakit tiny-model --output-dir models/tiny-qwen3-vl
    eqakit tiny-model --output-dir models/tiny-qwen2-5-vl --arch qwen2_5_vl
    eqakit tiny-model --output-dir models/tiny-qwen3-vl --seed 1 --overwrite

Raises EqakitError when the output directory exists and is not empty (unless overwrite is asked for).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqakit import __version__
from eqakit.errors import EqakitError
from eqakit.fsutil import move_into_place

if TYPE_CHECKING:
    from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3VLConfig

# Qwen2/Qwen3's added tokens, in Qwen's id order (they follow the BPE vocabulary there as here).
# The first 14 are special tokens; the rest are ordinary added tokens, as in Qwen's tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
REGULAR_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# BPE merges learned beyond the 256 byte symbols; the corpus below runs out of merges near here.
BPE_VOCAB_SIZE = 3000
# Qwen pads its embedding matrix (151,669 tokens -> 151,936 rows); consumers must cope with rows
# that no token uses, so the tiny model keeps that quirk.
VOCAB_MULTIPLE = 64

# Image/video processor settings of Qwen3-VL-2B-Instruct (preprocessor_config.json,
# video_preprocessor_config.json): pixels in [min, max] after resizing to multiples of 32.
IMAGE_MIN_PIXELS = 65536
IMAGE_MAX_PIXELS = 16777216
VIDEO_MIN_PIXELS = 4096
VIDEO_MAX_PIXELS = 25165824
PIXEL_MEAN_STD = [0.5, 0.5, 0.5]
# Qwen2.5-VL-3B-Instruct's preprocessor_config.json: patch 14 (one token per 28x28 pixels), OpenAI
# CLIP's normalization, pixels in [3136, 12845056] for images and video frames alike.
QWEN2_5_PATCH = 14
QWEN2_5_MIN_PIXELS = 3136
QWEN2_5_MAX_PIXELS = 12845056
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN2_5_WINDOW = 112  # vision window attention over 112x112-pixel windows (8x8 patches)

# Generation defaults of Qwen3-VL-2B-Instruct's generation_config.json.
SAMPLING_DEFAULTS = {
    "do_sample": True,
    "top_k": 20,
    "top_p": 0.8,
    "temperature": 0.7,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class TinySizes:
    """Layer sizes of the tiny model (Qwen3-VL-2B-Instruct's in the comments)."""

    hidden_size: int = 64  # 2048; also the vision merger's output size
    num_hidden_layers: int = 2  # 28
    num_attention_heads: int = 4  # 16
    num_key_value_heads: int = 2  # 8
    head_dim: int = 16  # 128
    intermediate_size: int = 128  # 6144
    vision_depth: int = 2  # 24
    vision_hidden_size: int = 32  # 1024
    vision_intermediate_size: int = 64  # 4096
    vision_num_heads: int = 2  # 16
    # The vision tower's learned position grid (bilinearly interpolated); a square number.
    vision_num_position_embeddings: int = 256  # 2304
    deepstack_visual_indexes: tuple[int, ...] = (1,)  # (5, 11, 17)
    # Std of the (tied) token embedding. With the usual 0.02 at width 64 the largest logit a
    # frozen final norm allows is about 1.3, so no adapter could ever make a confident prediction
    # (the loss floors near ln(vocab) - 1.3); a trained model's embeddings are far larger.
    embedding_std: float = 0.5
    # Std of every other language-model weight (Qwen's 0.02 suits width 2048, about 1/sqrt(width)).
    initializer_range: float = 0.02
    # --arch qwen3_vl_moe only (Qwen3-VL-30B-A3B-Instruct's in the comments): every layer's MLP is
    # num_experts experts of moe_intermediate_size, num_experts_per_tok of them per token.
    num_experts: int = 4  # 128
    num_experts_per_tok: int = 2  # 8
    moe_intermediate_size: int = (
        128  # 768 (a tiny expert narrower than the dense MLP barely reacts to its input)
    )

    def check(self) -> None:
        """Reject sizes the real classes would accept but then fail on deep inside a forward pass."""
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2 or self.head_dim < 8:
            problems.append("head_dim must be even and at least 8 (M-RoPE shares head_dim/2 among t, h, w)")
        if self.vision_hidden_size % (4 * self.vision_num_heads):
            problems.append("vision_hidden_size must be a multiple of 4 * vision_num_heads (2D rotary)")
        if int(self.vision_num_position_embeddings**0.5) ** 2 != self.vision_num_position_embeddings:
            problems.append("vision_num_position_embeddings must be a square number")
        if any(not 0 <= i < self.vision_depth for i in self.deepstack_visual_indexes):
            problems.append("deepstack_visual_indexes must lie in [0, vision_depth)")
        if len(self.deepstack_visual_indexes) > self.num_hidden_layers:
            problems.append("deepstack needs at least one language layer per deepstack index")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append("num_experts_per_tok must lie in [1, num_experts]")
        if min(self.embedding_std, self.initializer_range) <= 0:
            problems.append("embedding_std and initializer_range must be positive")
        if problems:
            raise ValueError(f"invalid tiny-model sizes {self}: " + "; ".join(problems))


ARCHS = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")  # config.json model_type of each architecture built here
TEMPLATE_FILES = {"qwen2_5_vl": "qwen2_5_vl_chat_template.jinja"}  # else Qwen3-VL-Instruct's


def build_tiny_model(
    output_dir: Path, seed: int = 0, *, overwrite: bool = False, arch: str = "qwen3_vl", **sizes: object
) -> Path:
    """Build the tiny model of ``arch`` (`ARCHS`: Qwen3-VL dense, Qwen3-VL-MoE or Qwen2.5-VL) and save
    it to ``output_dir``; return that path.

    ``sizes`` override fields of :class:`TinySizes` (a demo may want a slightly bigger model). The
    same seed and sizes give byte-identical weights. The directory appears whole or not at all: the
    model is saved into a temporary directory beside it and renamed into place.
    """
    import torch
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    from eqakit.model.merge import publish_expert_layout

    if arch not in ARCHS:
        raise EqakitError(f"--arch {arch!r} is not built here; choose one of {', '.join(ARCHS)}")
    dims = TinySizes(**sizes)  # an unknown size name raises TypeError
    dims.check()
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)

    processor = _build_processor(arch)
    if arch == "qwen2_5_vl":
        config, model_class = _qwen2_5_config(dims, processor.tokenizer), Qwen2_5_VLForConditionalGeneration
    else:
        config, model_class = _build_config(dims, processor.tokenizer), Qwen3VLForConditionalGeneration
    if arch == "qwen3_vl_moe":
        config, model_class = _moe_config(config, dims), Qwen3VLMoeForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)  # the weights are drawn from N(0, initializer_range) as the model is built
        model = model_class(config).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, dims.embedding_std)
    model.generation_config = _build_generation_config(processor.tokenizer)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        publish_expert_layout(sorted(staging.glob("model*.safetensors")), config)  # as Qwen publishes MoE
        processor.save_pretrained(staging)
        _write_provenance(staging, seed, dims, arch)
        move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def chat_template(arch: str = "qwen3_vl") -> str:
    """The chat template of ``arch``'s Instruct models (Qwen3-VL's, Qwen2.5-VL's), shipped as package data."""
    name = TEMPLATE_FILES.get(arch, "chat_template.jinja")
    return resources.files("eqakit.model").joinpath(name).read_text(encoding="utf-8")


def _build_processor(arch: str) -> Any:
    """The processor of ``arch`` with its 2B/3B Instruct model's image/video settings and the tiny
    tokenizer: Qwen3VLProcessor, or for Qwen2.5-VL Qwen2_5_VLProcessor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    if arch == "qwen2_5_vl":
        return _qwen2_5_processor()

    shared = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": PIXEL_MEAN_STD,
        "image_std": PIXEL_MEAN_STD,
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}, **shared
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        fps=2,
        min_frames=4,
        max_frames=768,
        **shared,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=_build_tokenizer(chat_template()),
        video_processor=video_processor,
        chat_template=chat_template(),
    )


def _qwen2_5_processor() -> Any:
    """Qwen2_5_VLProcessor as Qwen2.5-VL-3B-Instruct's: Qwen2-VL image and video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    shared = {
        "patch_size": QWEN2_5_PATCH,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "size": {"shortest_edge": QWEN2_5_MIN_PIXELS, "longest_edge": QWEN2_5_MAX_PIXELS},
    }
    template = chat_template("qwen2_5_vl")
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**shared),
        tokenizer=_build_tokenizer(template),
        video_processor=Qwen2VLVideoProcessor(fps=2, **shared),
        chat_template=template,
    )


def _build_tokenizer(template: str) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer whose byte-level BPE is trained here, with Qwen's added tokens after it.

    The pipeline (NFC, Qwen's pre-tokenizer regex, byte-level) is Qwen2Tokenizer's own; only the
    merges are learned from the built-in corpus. Training is deterministic, and the tokenizer does not
    depend on the model seed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Train with the pipeline Qwen2Tokenizer rebuilds around the learned vocabulary and merges.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    added = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    added += [AddedToken(t, special=False, normalized=False) for t in REGULAR_ADDED_TOKENS]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder={len(vocab) + i: token for i, token in enumerate(added)},
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=262144,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = template
    expected = {t: len(vocab) + i for i, t in enumerate(SPECIAL_TOKENS + REGULAR_ADDED_TOKENS)}
    actual = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    if actual != expected:  # a transformers change in how added tokens are numbered; fail loudly
        raise RuntimeError(f"tiny tokenizer added-token ids {actual} != expected {expected}")
    return tokenizer


def _token_ids(tokenizer: Qwen2Tokenizer) -> tuple[dict[str, int], int]:
    """The special tokens' ids, and the vocabulary size padded as Qwen pads its embedding matrix."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return ids, -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The image, video and vision start/end ids every Qwen-VL config names."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_sizes(dims: TinySizes) -> dict[str, Any]:
    """The language model's sizes, as both families' text configs name them."""
    return {
        "hidden_size": dims.hidden_size,
        "initializer_range": dims.initializer_range,
        "intermediate_size": dims.intermediate_size,
        "num_attention_heads": dims.num_attention_heads,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_key_value_heads": dims.num_key_value_heads,
    }


def _mrope_section(head_dim: int, height_width_of_64: int) -> list[int]:
    """M-RoPE's (t, h, w) split of head_dim / 2 rotary frequencies, in the real model's proportions
    (h and w take ``height_width_of_64`` of every 64)."""
    height_width = head_dim // 2 * height_width_of_64 // 64
    return [head_dim // 2 - 2 * height_width, height_width, height_width]


def _build_config(dims: TinySizes, tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Qwen3VLConfig shaped like Qwen3-VL-2B-Instruct's, at ``dims``' sizes, with this tokenizer's ids."""
    from transformers import Qwen3VLConfig

    ids, vocab_size = _token_ids(tokenizer)
    # Real: head_dim 128 -> mrope_section [24, 20, 20] over head_dim/2 = 64 rotary frequencies.
    mrope_section = _mrope_section(dims.head_dim, 20)
    return Qwen3VLConfig(
        architectures=["Qwen3VLForConditionalGeneration"],
        **_vision_token_ids(ids),
        tie_word_embeddings=True,
        text_config={
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "dtype": "float32",
            "head_dim": dims.head_dim,
            "hidden_act": "silu",
            **_text_sizes(dims),
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000,
                "mrope_interleaved": True,
                "mrope_section": mrope_section,
            },
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        vision_config={
            "deepstack_visual_indexes": list(dims.deepstack_visual_indexes),
            "depth": dims.vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": dims.vision_hidden_size,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": dims.vision_intermediate_size,
            "num_heads": dims.vision_num_heads,
            "num_position_embeddings": dims.vision_num_position_embeddings,
            "out_hidden_size": dims.hidden_size,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    )


def _moe_config(dense: Qwen3VLConfig, dims: TinySizes) -> Any:
    """The dense config with Qwen3-VL-MoE's text model: every layer's MLP a sparse block of experts."""
    from transformers import Qwen3VLMoeConfig

    values = dense.to_dict()
    text, vision = values["text_config"], values["vision_config"]
    for part in (text, vision):
        part.pop("model_type", None)
    text.update(
        num_experts=dims.num_experts,
        num_experts_per_tok=dims.num_experts_per_tok,
        moe_intermediate_size=dims.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,  # Qwen3-VL-30B-A3B's (transformers' class always normalizes; vLLM reads it)
    )
    ids = {
        k: values[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    return Qwen3VLMoeConfig(
        architectures=["Qwen3VLMoeForConditionalGeneration"],
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        **ids,
    )


def _qwen2_5_config(dims: TinySizes, tokenizer: Qwen2Tokenizer) -> Any:
    """Qwen2_5_VLConfig shaped like Qwen2.5-VL-3B-Instruct's at ``dims``' sizes. Not used here:
    ``head_dim`` (hidden_size / num_attention_heads instead), the deepstack indexes and the MoE sizes.
    The vision tower's last block attends in full, the others within windows, as in the real model."""
    from transformers import Qwen2_5_VLConfig

    if dims.hidden_size % dims.num_attention_heads:
        raise ValueError("qwen2_5_vl: hidden_size must be a multiple of num_attention_heads")
    head_dim = dims.hidden_size // dims.num_attention_heads  # Qwen2.5-VL's text config has no head_dim
    ids, vocab_size = _token_ids(tokenizer)
    # Real: head_dim 128 -> mrope_section [16, 24, 24] over 64 rotary frequencies (not interleaved).
    mrope_section = _mrope_section(head_dim, 24)
    return Qwen2_5_VLConfig(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        **_vision_token_ids(ids),
        tie_word_embeddings=True,
        text_config={
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "dtype": "float32",
            "hidden_act": "silu",
            **_text_sizes(dims),
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section,
            },
            "tie_word_embeddings": True,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": vocab_size,
        },
        vision_config={
            "depth": dims.vision_depth,
            "fullatt_block_indexes": [dims.vision_depth - 1],  # real: every 8th block, the last included
            "hidden_act": "silu",
            "hidden_size": dims.vision_hidden_size,
            "in_channels": 3,
            "intermediate_size": dims.vision_intermediate_size,
            "num_heads": dims.vision_num_heads,
            "out_hidden_size": dims.hidden_size,
            "patch_size": QWEN2_5_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": QWEN2_5_WINDOW,
        },
    )


def _build_generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Qwen3-VL-Instruct's sampling defaults; generation stops at <|im_end|> or <|endoftext|>."""
    from transformers import GenerationConfig

    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return GenerationConfig(
        bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext], **SAMPLING_DEFAULTS
    )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise EqakitError(f"--output-dir {output_dir} is a file, not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise EqakitError(
            f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it "
            "or choose another directory"
        )


def _write_provenance(directory: Path, seed: int, dims: TinySizes, arch: str) -> None:
    """Record how the model was made, so a directory found later explains itself."""
    import tokenizers
    import torch
    import transformers

    info = {
        "what": f"tiny random-weight {arch} model built by `eqakit tiny-model` (its answers are noise)",
        "arch": arch,
        "seed": seed,
        "sizes": asdict(dims),
        "versions": {
            "eqakit": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (directory / "eqakit_tiny_model.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# Built-in tokenizer corpus: the words of embodied-QA questions and answers plus common English.
_ROOMS = (
    "kitchen bedroom bathroom living room dining room hallway office garage laundry closet basement attic "
    "porch balcony staircase stairs entrance lobby study nursery pantry corridor lounge gym library garden "
    "yard patio classroom workshop storage room apartment house home floor ceiling wall door doorway"
)
_OBJECTS = (
    "chair table sofa couch bed lamp desk shelf bookshelf cabinet drawer dresser wardrobe mirror window "
    "curtain blind rug carpet pillow cushion blanket towel sink toilet shower bathtub faucet stove oven "
    "microwave fridge refrigerator dishwasher kettle toaster pan pot plate bowl cup mug glass bottle jar "
    "knife fork spoon television tv remote computer laptop monitor keyboard mouse phone clock picture "
    "painting poster frame plant flower vase basket box bag backpack shoe boot hat coat jacket umbrella "
    "book notebook pen pencil paper trash can bin recycling fan heater radiator vent light switch outlet "
    "cable charger speaker guitar piano toy ball bicycle bike car stool bench ottoman nightstand counter "
    "countertop island rack hook hanger broom mop bucket vacuum cleaner iron board printer fireplace "
    "candle sign calendar whiteboard door handle knob key wallet watch glasses"
)
_COLOURS = (
    "red green blue yellow orange purple pink brown black white gray grey beige tan silver gold navy "
    "cream teal turquoise maroon violet dark light bright pale colorful striped patterned wooden"
)
_ATTRIBUTES = (
    "open closed on off empty full clean dirty messy tidy broken new old large big small tiny tall short "
    "long wide narrow round square rectangular soft hard heavy metal plastic glass wood leather fabric "
    "ceramic stone marble hot cold warm wet dry folded unmade made stacked hanging leaning lit plugged"
)
_SPATIAL = (
    "left right above below behind front next to near far between under over on top bottom inside outside "
    "corner center middle beside against across opposite around along upstairs downstairs north south "
    "east west side edge back closest farthest nearest higher lower"
)
_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred first second third fourth "
    "fifth last single pair couple several many few some none both all"
)
_VERBS = (
    "sit sleep cook wash eat drink read write watch store hang keep clean dry heat cool light open close "
    "turn use find put place carry hold charge play work rest relax sweep wipe fold iron brush dress "
    "leave enter go walk check see look tell know need want get take make"
)
_COMMON = (
    "the a an is are was were be been being it its this that these those there here what where which who "
    "whom whose why how when can could should would will shall may might must do does did done have has "
    "had of in to for with by from at as about into through after before during without within and or "
    "but not no yes if then than so because while until also only just very too more most less least "
    "same other another each every any such own I you he she we they me him her us them my your his our "
    "their mine yours color colour object objects room rooms item items thing things part kind type "
    "shape size number count many much time day night morning evening today now again still already "
    "answer question image images frame frames video camera view scene robot agent assistant user system "
    "helpful please thank thanks sorry okay sure maybe probably possibly likely unknown nothing something "
    "anything everything someone people person man woman child dog cat pet food water coffee tea milk "
    "fruit apple banana bread dinner breakfast lunch meal clothes laundry dishes game music movie news "
    "weather outside inside safe dangerous possible impossible true false correct wrong good bad better "
    "best worse worst able way place area space spot location position direction distance height width"
)
_CHINESE = "是 否 的 红色 蓝色 绿色 黄色 白色 黑色 厨房 卧室 客厅 浴室 桌子 椅子 沙发 床 灯 左边 右边 上面 下面 一 二 三 几个 什么 哪里 房间 图片"
_QUESTIONS = (
    "What color is the {o} in the {r}?",
    "What colour is the {o}?",
    "Where is the {o}?",
    "Where did I leave my {o}?",
    "How many {o}s are in the {r}?",
    "Is the {o} {a}?",
    "Is the {o} to the {s} of the {o2}?",
    "Which is closer to the {o}, the {o2} or the {o3}?",
    "What is {s} the {o}?",
    "What can I use to {v} in the {r}?",
    "What is the {o} made of?",
    "Is there a {o} in the {r}?",
    "Can I {v} on the {o}?",
    "What room is the {o} in?",
    "Is the {r} {a}?",
    "What is on the {o}?",
)
_ANSWERS = (
    "The {o} is {c}.",
    "It is {c}.",
    "It is {s} the {o2}.",
    "In the {r}, {s} the {o2}.",
    "There are {n} {o}s.",
    "{n}",
    "Yes.",
    "No.",
    "Yes, it is {a}.",
    "No, it is not {a}.",
    "The {o2}.",
    "You can use the {o}.",
    "It is made of {a}.",
    "The {o} is in the {r}.",
    "{C}",
)


def _corpus() -> list[str]:
    """Deterministic question/answer lines plus every vocabulary word in several spellings."""
    objects, rooms = _OBJECTS.split(), _ROOMS.split()
    colours, attributes, spatial = _COLOURS.split(), _ATTRIBUTES.split(), _SPATIAL.split()
    numbers, verbs = _NUMBERS.split(), _VERBS.split()
    words = objects + rooms + colours + attributes + spatial + numbers + verbs + _COMMON.split()
    rng = random.Random(0)
    lines = [" ".join(words), " ".join(w.capitalize() for w in words), " ".join(w.upper() for w in words)]
    lines += [_CHINESE] * 100 + ["system\n", "user\n", "assistant\n"] * 100
    lines += [f"{i} {i * 7 % 100}: {i}.{i % 10}%, ({i}) [{i}] {{{i}}} - {i}/{i + 1}" for i in range(200)]
    for i in range(6000):
        fill = {
            "o": rng.choice(objects),
            "o2": rng.choice(objects),
            "o3": rng.choice(objects),
            "r": rng.choice(rooms),
            "c": rng.choice(colours),
            "C": rng.choice(colours).capitalize(),
            "a": rng.choice(attributes),
            "s": rng.choice(spatial),
            "n": rng.choice(numbers),
            "v": rng.choice(verbs),
        }
        lines.append(_QUESTIONS[i % len(_QUESTIONS)].format(**fill))
        lines.append(_ANSWERS[i % len(_ANSWERS)].format(**fill))
    return lines


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit tiny-model",
        description="Build a tiny random-weight Qwen-VL model (real transformers classes, the family's "
        "tokens and chat format) for tests and the demo.",
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="directory to save the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output-dir if it exists and is not empty"
    )
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="qwen3_vl",
        help="qwen3_vl (dense, as Qwen3-VL-2B), qwen3_vl_moe (experts, as Qwen3-VL-30B-A3B) or "
        "qwen2_5_vl (as Qwen2.5-VL-3B)",
    )
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output_dir, seed=args.seed, overwrite=args.overwrite, arch=args.arch)
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    print(f"wrote tiny {args.arch} (seed {args.seed}, {size_mb:.1f} MB) to {path}")
    return 0
