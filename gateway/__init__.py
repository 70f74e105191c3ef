"""vllm-guard: an admission gateway in front of a co-located vLLM engine."""
