"""Evaluation: the lm-eval battery (requests built once per run), the prefix-sharing scorer, the
runner that turns a plan into content-keyed units, and the pace that estimates their cost."""
