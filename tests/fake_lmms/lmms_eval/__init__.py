"""A stand-in for lmms-eval in tests: `python -m lmms_eval` writes a results JSON in lmms-eval 0.7.3's layout."""
