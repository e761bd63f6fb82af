"""Ray Tune wiring: Ray's start, the Tuner, its schedulers, restore, signals and progress."""
