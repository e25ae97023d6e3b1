"""The jobs: ``python -m specext.analyze`` (:mod:`.analyze` the command line, :mod:`.run`
the orchestration, :mod:`.rundir` the run directory: state, resume, atomic writers, CSVs),
``python -m specext.compare`` (:mod:`.compare`), and the training loop shared by the demo
builder and fine-tuning (:mod:`.training`). May import everything below it and ``report``."""
