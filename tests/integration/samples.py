"""Sample texts the integration tests run through tiny models (a module, not conftest: a second conftest.py,
in tests/acceptance, would shadow the name)."""

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs.", "日本語のテキストです。",
         "Le renard brun rapide saute par-dessus le chien paresseux, puis il s'en va."]
