"""The paper's three-stage training (spec §6) on the inference networks of ``models``.

``manifest`` and ``prepare`` turn folders of colour photos into a manifest with detected boxes;
``data`` makes the per-stage samples (grey L in, colour ab as target); ``losses`` is the
reference's loss; ``stages`` builds what each stage trains from an init; ``run_files`` writes the
run directory (official-layout checkpoints, state, metrics) atomically; ``distributed`` is the
torchrun set-up; ``loop`` is the training loop a reader can follow top to bottom.
"""
