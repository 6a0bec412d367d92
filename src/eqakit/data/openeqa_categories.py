"""OpenEQA's seven question categories, in the order the OpenEQA paper lists them.

One definition shared by the synthetic-data generator (which must cover all seven) and `prepare`
(which rejects unknown categories and balances them across splits).
"""

from __future__ import annotations

OPENEQA_CATEGORIES: tuple[str, ...] = (
    "object recognition",
    "attribute recognition",
    "object state recognition",
    "object localization",
    "spatial understanding",
    "functional reasoning",
    "world knowledge",
)
