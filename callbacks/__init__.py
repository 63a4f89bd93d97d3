"""Schedules and writers that run beside training."""
