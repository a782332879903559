"""AEGIS core: what every stage shares (the soul, its schedule, checkpoint I/O, loading a model, run metrics, the
embedded tiny model). train/, export/ and serve/ import it; it imports none of them."""

import logging
import warnings

# Two notes every command would print that say nothing to the user, dropped by their exact text. They are set here,
# on the package every stage imports first, because bitsandbytes logs its note while it is imported (by peft or
# transformers, whichever comes first): on CPUs with AVX-512 BF16 it says an optional hub-downloaded kernel package is
# missing (its own CPU kernels are used). peft reads the model's `is_gradient_checkpointing`, which transformers 5
# deprecates.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage()
)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
