"""AEGIS training: soul injection into a 4-bit LoRA-tuned causal LM."""
