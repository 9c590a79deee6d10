"""Runtime: the devices a check runs on and the environment that changes its numbers.

Index:
    devices.py      device strings, discovery (npu, cuda, mps, cpu), distributed backends,
                    torch_npu without its toolkit kept from breaking `import torch`
    environment.py  the record of every numerics switch and library version of a run
"""
