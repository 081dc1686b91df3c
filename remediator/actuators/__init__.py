"""Actuators: one kernel knob each (read, apply, restore), plus dry-run twins."""
