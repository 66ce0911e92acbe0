"""The coordinator: a gRPC daemon that runs global transactions over participant
agents with presumed-abort two-phase commit, forcing every COMMIT decision to its
decision log before any participant hears of it. `coordinator.client` is the
library applications use to talk to it.
"""
