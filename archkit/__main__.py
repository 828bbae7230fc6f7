"""``python -m archkit``, as ``torchrun -m archkit train SPEC`` runs it."""

from archkit.cli import main

main()
