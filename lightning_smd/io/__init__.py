"""Results in and out, without torch: the summary table and file, what each logger gets, the dashboards, the
plots and the ``lightning-smd`` command line."""
