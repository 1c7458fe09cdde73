"""Full fine-tuning: no adapter, every weight trains. The init is the original model, whatever the rank says."""
from lnull.methods.base import Method, register

FULL = register(Method("full", None, key_options=lambda options: {"name": options["name"]},
                       description="full fine-tuning (no adapter)"))
