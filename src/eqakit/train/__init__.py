"""LoRA supervised fine-tuning of Qwen3-VL (`eqakit train`)."""
