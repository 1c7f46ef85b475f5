"""megagrow: Megatron-style GPT pre-training on megatron-core, with growth stages."""

import warnings

# megatron-core warns at import that the optional GPU extras are absent; the torch fallbacks it
# names are what megagrow expects on such machines, so the warnings say nothing actionable.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")

import logging

# A CUDA build of torch on a machine without a GPU logs this when megatron-core imports its extension
# helpers; the CPU path needs no CUDA toolkit, and the line would break one-line error messages.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from megagrow.runtime import deferred_compile

deferred_compile.install()  # before anything imports megatron-core (why: runtime/deferred_compile.py)
