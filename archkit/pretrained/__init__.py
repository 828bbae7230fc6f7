"""Pretrained Llama-family weights in archkit: ``source`` finds a checkpoint and reads its
shape, ``retrofit`` plans the edited layer list (both read by the spec), ``weights`` loads
the tensors into a built model and ``tokenizer`` gives the checkpoint's tokenizer.

Nothing is imported here, so the spec can read shapes without importing torch-level code.
"""
