"""The PyTorch reference side: transformers' model run the way the MLX side runs it, for every
number mlx-listen computes (`hf`: forward passes, generation, steering, option log-probs;
`ablation`, `patching`, `lens`: the interventions), tiny random checkpoints for the tests (`tiny`)
and `mlx-listen-reference` (`run`), which writes reference bundles. Needs torch and transformers."""
