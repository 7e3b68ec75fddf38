"""Background prediction jobs: tasks a /predict call could not reach before its deadline are kept in a
persistent store (``store``), predicted by a per-process ``runner`` thread, and written to Label Studio
through its API by ``writer``, with the model version of the /predict call so nothing is duplicated."""
