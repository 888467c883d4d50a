"""Generation: the :class:`Generator` (one model and options, many calls) and what it is made of.

``generator`` drives a call; ``validation`` checks its input; ``params`` holds a call's
sampling parameters and the checkpoint's defaults; ``sampling`` picks tokens;
``graphs`` compiles the model's graphs and checks a call against their budget; ``captures``
saves and reuses dynamo's captures on disk; ``kept`` holds the generators ``hscompile.generate``
keeps on a model; ``tuning`` measures the hardware profile with hscompile's own overhead.
"""

from .generator import Generator, generate
from .tuning import measure_layer_overhead, tune

__all__ = ["Generator", "generate", "measure_layer_overhead", "tune"]
