"""The runtime a schedule runs on: devices, the weight store and slot ring, the block-cache
allocator, the cache steps, mini-batch execution, the executor and its timeline. Imports
:mod:`hscompile.ir` and :mod:`hscompile.ops`; never :mod:`hscompile.passes` or the planner."""
