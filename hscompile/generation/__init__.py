"""Generation: the :class:`Generator` (one model and options, many calls) and what it is made of.

``generator`` drives a call; ``validation`` checks its input; ``sampling`` picks tokens;
``graphs`` compiles the model's graphs and checks a call against their budget; ``tuning``
measures the hardware profile with hscompile's own overhead.
"""

from .generator import Generator, generate
from .tuning import measure_layer_overhead, tune

__all__ = ["Generator", "generate", "measure_layer_overhead", "tune"]
