"""One controller and one mpiexec engine set: the lifecycle (:mod:`.lifecycle`,
:mod:`.state`), the servers (:mod:`.servers`), the ipyparallel cluster and launchers
(:mod:`.ipp_cluster`, :mod:`.launcher`, :mod:`.batch_launcher`), cleaning up
(:mod:`.janitor`, :mod:`.watchdog`), keys and encryption (:mod:`.keyfile`,
:mod:`.encryption`)."""
