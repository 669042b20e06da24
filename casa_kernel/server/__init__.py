"""What runs on a server (an ipyparallel engine inside the mpiexec world): cells and
tasks (:mod:`.engine`), cube jobs (:mod:`.cube`), the output stream (:mod:`.output`).
Imports nothing of the kernel's client or cluster machinery (the ladder test checks)."""
