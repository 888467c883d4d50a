"""Planning: hardware profiles, the cost model and its policy search, budgets, mini-batch
formation and admission into waves, and the per-call decision. Numbers in, decisions out;
imports only :mod:`hscompile.ir` (and the base modules)."""
