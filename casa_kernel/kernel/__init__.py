"""The Jupyter side: the kernel (:mod:`.kernel`), its magics (:mod:`.magics`),
the cluster it owns (:mod:`.session`) and its kernelspec (:mod:`.kernelspec`)."""
