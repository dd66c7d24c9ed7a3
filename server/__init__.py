"""The serving process: settings, errors, metrics, state pool, engine, scheduler, sessions, servicers."""
