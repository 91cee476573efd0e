"""Module that fails on import, to exercise the registry's broken-plugin error."""

raise ImportError("mace_lr_fixture_plugin.broken is deliberately broken (test fixture)")
