"""Building blocks of the byte-level language-model demo (``examples/train_lm.py``)."""
