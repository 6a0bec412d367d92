"""eqakit's transformers backend: batched, cached Qwen3-VL generation (see eqakit.engine.hf.engine)."""
