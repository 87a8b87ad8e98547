"""The method and its runs: finding the audio-specialist heads, validating the listening score,
steering directions and sweeps, the cross-fitted experiment and its report, and the data-set runs
of the causal tools (patching maps, the lens over items, head means). A run takes a data set,
writes records (resumable through `records.Stage`) and plots."""
