"""Work sent to the servers: the dispatcher (:mod:`.dispatch`), jobs and their
outcomes (:mod:`.jobs`), Ctrl-C and time limits (:mod:`.interrupts`), progress
(:mod:`.progress`)."""
