"""One experiment: `build` (config -> everything a run needs), `loop` (rounds and
callbacks), `callbacks` (evaluation, traffic, privacy, logs, checkpoints),
`train` (the wiring a launch runs), `sweep` (many runs from one config file),
`results` (tables and figures over runs) and `reports` (masks and privacy, no training).
"""
