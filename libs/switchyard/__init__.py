"""Switchyard: shared libraries (config, bus, model building, generated contracts)."""
