"""LoRA supervised fine-tuning of Qwen-VL models (`eqakit train`)."""
