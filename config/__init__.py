"""Process configuration shared by every server process: the settings (:mod:`config.settings`)
and the logging set-up (:mod:`config.logs`). A leaf: it imports nothing of the project."""
