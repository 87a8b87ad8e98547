"""`mlx-listen serve`: the model behind an OpenAI-compatible API (`server`), with the listening
score per token, steering and ablation through the `mlx_listen` extension object (`protocol`),
one model session with a prompt cache keyed by the audio's content (`engine`)."""
