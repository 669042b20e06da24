"""``python -m casa_kernel -f CONNECTION_FILE``: what the kernelspec runs."""

from ipykernel.kernelapp import IPKernelApp

from casa_kernel.kernel.kernel import CasaKernel

if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=CasaKernel)
