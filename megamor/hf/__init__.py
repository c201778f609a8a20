"""Hugging Face interop: export (`megamor convert to-hf`), import (`megamor convert from-hf`) and
the MoR modeling code shipped inside every MoR export (`modeling_mor.py`, `configuration_mor.py`:
these two files import only torch and transformers, never megamor)."""
