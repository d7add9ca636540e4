"""The server side of the command line (``serve``, ``api``, ``worker``, ``migrate``, ``keys``, ``projects``)."""
