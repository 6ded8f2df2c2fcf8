"""The Qwen-VL model: ViT -> position-aware adapter -> Qwen LLM, and its weight I/O.

config.py (torch-free sizes and their validation), vision.py, adapter.py, qwenvl.py
(`QwenVL`, `build_model`), groups.py (the module-group registry), weights.py (import and
export). Import from the submodules: importing the package stays light, so validating a
config does not load torch or transformers.
"""
