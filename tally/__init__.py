"""Tally: usage & billing for LLM gateways.

`tally.runtime` is the runtime every service shares; `tally.<service>.v1` holds the code
generated from `protos/tally/<service>/v1/<service>.proto`.
"""
