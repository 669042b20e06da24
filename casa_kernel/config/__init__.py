"""What to start, decided before anything runs (pure but reading files): the
settings (:mod:`.settings`), hostfiles and placement (:mod:`.hostfile`,
:mod:`.local_load`), batch allocations and jobs (:mod:`.allocation`, :mod:`.batch`),
the mpiexec command line (:mod:`.mpiexec`) and security choices (:mod:`.security`)."""
