"""Background prediction jobs: tasks a /predict call could not reach before its deadline are kept in a
persistent store (``store``), predicted by a per-process ``runner`` thread, and written to Label Studio
through its API by ``writer``, with the model version of the /predict call so nothing is duplicated.

Modules:
    db        the shared database (JOBS_DB, else DATA_DIR/jobs.sqlite3; SQLite WAL, file mode 0600)
    store     JobStore: create_job (idempotent), claim_tasks (leases), mark_done / mark_failed
              (bounded retries), cancel, progress (rate, ETA, errors), list_jobs, resume
    projects  ProjectStates (``JobStore.projects``): remembered prompt, /setup extra_params, label
              config and credentials, shared by every worker
    writer    write_predictions: bulk ``import/predictions`` in chunks, skipping tasks that already
              have a prediction of the version; 401/403 -> LabelStudioAuthError
    workers   worker_name / worker_gone: who holds a lease, and whether its process is dead
    runner    JobRunner: claim, predict (a TaskPredictor), buffer, write, record; start()/stop() for
              a background thread that resumes unfinished jobs, run_job()/run_until_idle() for a CLI

Wiring, per worker process (after gunicorn forks)::

    store = JobStore()                                   # JOBS_DB / DATA_DIR
    runner = JobRunner(store, predict, client_factory)   # predict(job, task) -> /predict entry
    runner.start()
    ...
    created = store.create_job(project, version, unreached_tasks, plan=..., label_config=...,
                               credentials=...)
    runner.wake()
"""
