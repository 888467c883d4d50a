"""Graph passes: pure functions from a captured graph (and the plan made of it) to a schedule,
run by :mod:`~hscompile.passes.manager`. Import :mod:`hscompile.ir`, :mod:`hscompile.ops` and
:mod:`hscompile.planner`; never :mod:`hscompile.runtime`.

Naming rule: a pass is named by what it does, and its module, its function and its
:class:`~hscompile.passes.manager.PassSpec` name (in :mod:`hscompile.backend`) are that same name:
``inline_regions``, ``analyze``, ``estimate_activations``, ``place``, ``partition``,
``recompute_program`` (``build_recompute_program``), ``rewrite_for_cache``, ``quantize_weights``,
``offload``, ``verify_schedule``, ``lower``. The one module that is not a pass is ``manager``.
"""
