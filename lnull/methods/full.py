"""Full fine-tuning: no adapter, every weight trains."""
from lnull.methods.base import Method, register

FULL = register(Method("full", None, description="full fine-tuning (no adapter)"))
