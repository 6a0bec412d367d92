"""eqakit's transformers backend: batched, cached Qwen-VL generation (see eqakit.engine.hf.engine)."""
