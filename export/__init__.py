"""AEGIS export: merge, fold the soul, write GGUF, check parity, make an Ollama model."""
