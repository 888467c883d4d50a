"""Graph passes: pure functions from a captured graph (and the plan made of it) to a schedule,
run by :mod:`~hscompile.passes.manager`. Import :mod:`hscompile.ir`, :mod:`hscompile.ops` and
:mod:`hscompile.planner`; never :mod:`hscompile.runtime`."""
