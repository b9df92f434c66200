"""Generated code for the ``fedkd.v1`` wire contract (``protos/fedkd/v1/fedkd.proto``).

Do not edit: regenerate with ``python protos/generate.py``. Convert between
torch tensors and messages with :mod:`fedkd.codec`.
"""
