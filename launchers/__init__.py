"""Launchers: one class per launcher with a pure build_command(cfg) -> (argv, env)."""
