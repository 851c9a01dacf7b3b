"""lmforge: pretrain, fine-tune and preference-tune language models from one config file."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on import that it cannot fetch an optional CPU kernel from a model hub; lmforge never
# downloads at run time, so the warning only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
