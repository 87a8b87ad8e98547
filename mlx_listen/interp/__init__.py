"""Mechanisms: pure functions of a model and a prompt that return arrays (no data sets, no files).

- `steering`: the audio–silence direction d(x), the steering edit, the silence pass;
- `ablation`: head ablation and masking heads off the audio;
- `patching`: activation patching audio into silence, batched;
- `scoring`: every option's log-probability from one prefill;
- `lens`: the logit lens of a direction.
"""
