"""Serving: the OpenAI-compatible API (`eqakit.serve.api`), its request schema and image loading.

Nothing is imported here, so `eqakit webui` or `eqakit chat` do not pay for FastAPI.
"""
