"""Benchmarks (`matvit bench ...`): cross-consistency against baselines, index scale and speed, model speed, the query
cascade, and their reports and plots. Each benchmark module registers its subcommand with `add_parser`
(app/cli/bench.py lists them); the research studies are in scripts/studies/."""
