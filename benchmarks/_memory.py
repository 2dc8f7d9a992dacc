"""The kernel's account of this process's memory, which counts every native
allocation (PyTorch's, XLA's and TensorFlow's allocators, memory-mapped
pages once touched), not only Python's. Linux only."""


def resident_gb():
    """`(now, peak)`: this process's resident memory (`VmRSS`) and its peak
    so far (`VmHWM`), in GB."""
    fields = {}
    with open("/proc/self/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 2**20
    return round(fields["VmRSS"], 2), round(fields["VmHWM"], 2)
