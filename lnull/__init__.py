"""lnull: reproduce LoRA-Null (null-space LoRA initialisation) end to end."""
__version__ = "0.1.0"
