"""Plain data every layer shares: the model plan, weight layouts, the policy and its device-memory
arithmetic, the schedule's vocabulary, the activation estimate, the cache's dimensions, and FX
helpers. Imports only :mod:`hscompile.config` and :mod:`hscompile.errors`."""
