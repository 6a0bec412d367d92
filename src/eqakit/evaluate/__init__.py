"""Evaluation: predictions in, numbers people can compare out.

- ``metrics``: BLEU-4 and ROUGE-1/2/L exactly as LLaMA-Factory computes them, plus exact match and token
  F1, overall and per OpenEQA category (``score_predictions``);
- ``report``: report.md tables and base-vs-fine-tuned comparisons;
- ``llm_match``: ``eqakit judge``, OpenEQA's LLM-Match with an OpenAI-compatible judge;
- ``predict``: the predict loop of ``eqakit train`` with ``do_predict``.
"""
