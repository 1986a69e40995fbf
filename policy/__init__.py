"""What the policy *is*: scale schedules, the multi-scale tokenizer, the next-scale transformer, weight I/O.

Importing the package registers its model folders with transformers' Auto classes (see policy/hf.py).
"""
from policy import hf  # noqa: F401  (registers the configs with transformers' AutoConfig / AutoModel)
