"""Top-level conftest: the kvmtest pytest plugin is loaded through its
pytest11 entry point (installed by scripts/install.sh), so nothing lives here."""
