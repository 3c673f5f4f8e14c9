"""Collective boost-tuning: small speculative models trained on the LLM's own outputs, each next one
weighted towards the tokens the earlier ones miss."""
