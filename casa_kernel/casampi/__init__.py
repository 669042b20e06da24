"""The casampi surface served to casatasks in the kernel (:mod:`.bridge`) and the
routes of CASA's tasks: Multi-MS tasks (:mod:`.tasks`), imaging (:mod:`.imaging`),
cubes (:mod:`.cube`)."""
