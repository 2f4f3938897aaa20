"""`python -m megatronish.ops`: build the kernels if a GPU is present and print which path each op takes."""

from megatronish.ops.status import format_status, kernel_status

if __name__ == "__main__":
    print(format_status(kernel_status()))
