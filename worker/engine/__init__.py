"""Model loading, batching, the decode loop and per-row sampling."""

import logging
import os

# transformers imports torchao wherever it is installed (it comes with gptqmodel, for AWQ),
# and torchao then says at every start that native kernels this build lacks did not load,
# and torch that its enums are registered the old way: none of it concerns the engine, which
# uses neither, and it would bury `mbatch run`'s summary.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
